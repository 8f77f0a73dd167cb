"""The constructed inputs really are the witnesses they claim to be, judged by bitsandbytes itself.

A strategy that stopped producing a tie would make the suite blind to the bugs that
only ties show, while every test stayed green; these tests keep each claim honest.
"""

import bitsandbytes.functional as bnb_functional
import torch

from lora_lab.conformance.judge.strategies import WITNESS_ABSMAX, WITNESS_VALUE, nf4_midpoints, nf4_witnesses
from lora_lab.conformance.properties.double_quant import every_grid_point_weight
from lora_lab.nf4 import NF4_CODE, dynamic_map


def bnb_codes(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    packed, _ = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4")
    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 0x0F], 1).reshape(-1)[: weight.numel()]


def test_bitsandbytes_takes_the_lower_level_on_every_fp32_midpoint():
    weight = torch.cat([torch.ones(1), nf4_midpoints(), torch.zeros(48)])
    assert bnb_codes(weight)[1:16].tolist() == list(range(15))
    float64_midpoints = (NF4_CODE[:-1].double() + NF4_CODE[1:].double()) / 2
    assert int((nf4_midpoints().double() != float64_midpoints).sum()) == 9, "fp32 and float64 midpoints differ for 9"


def test_multiply_and_divide_witness_differs_between_full_and_short_blocks():
    a, x = torch.tensor(WITNESS_ABSMAX), torch.tensor(WITNESS_VALUE)
    assert x * (1 / a) != x / a
    full = torch.zeros(64)
    full[:2] = torch.tensor([WITNESS_ABSMAX, WITNESS_VALUE])
    short = torch.cat([torch.randn(64), full[:40]])
    assert int(bnb_codes(full)[1]) == 6 and int(bnb_codes(short)[65]) == 5  # multiplied in full, divided in short blocks


def test_zero_last_blocks_store_zero_when_full_and_1e_38_when_short():
    zero_last = [weight for weight, _ in nf4_witnesses() if not weight[64:].any()]
    full, short = sorted(zero_last, key=len, reverse=True)
    assert len(full) == 128 and len(short) == 94
    assert bnb_functional.quantize_4bit(full, blocksize=64, quant_type="nf4")[1].absmax[-1] == 0
    assert 0 < bnb_functional.quantize_4bit(short, blocksize=64, quant_type="nf4")[1].absmax[-1] <= 1e-38


def test_grid_weight_visits_every_grid_cell_and_the_places_where_skipping_the_grid_differs():
    weight = every_grid_point_weight()
    _, state = bnb_functional.quantize_4bit(weight, blocksize=32, quant_type="nf4", compress_statistics=True)
    absmax = weight.view(-1, 32)[:, 0]
    normalized = (absmax.double() - float(state.offset)) / state.state2.absmax.double().repeat_interleave(256)[: absmax.numel()]
    cells = ((normalized.clamp(-1, 1) + 1) * 0.5 * 65535 + 0.5).long()
    assert cells.unique().numel() == 65536
    direct = (normalized.float()[:, None] - dynamic_map()[None, :]).abs().argmin(1)
    assert int((direct != state.absmax.long()).sum()) > 50
