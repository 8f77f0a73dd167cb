"""Reference-only properties of lora_lab.nf4 that are not part of the conformance protocol."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_lab.conformance.judge.strategies import nf4_weights as weights
from lora_lab.nf4 import (
    CPU_CHUNK,
    NF4_CODE,
    NF4Tensor,
    _nearest_nf4_code_by_bits,
    dequantize_nf4,
    dequantize_nf4_by_definition,
    dynamic_map,
    nearest_nf4_code,
    quantize_nf4,
)


def test_code_tables_are_bitsandbytes_own():
    import bitsandbytes.functional as F
    from bitsandbytes.backends.utils import _get_4bit_code

    assert torch.equal(NF4_CODE, _get_4bit_code("nf4", torch.device("cpu")))
    assert torch.equal(dynamic_map(), F.create_dynamic_map())


@settings(max_examples=20)
@given(weights(), st.booleans())
def test_from_bnb_wraps_bitsandbytes_state_losslessly(drawn, double_quant):
    import bitsandbytes.functional as F

    weight, blocksize = drawn
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    ours = NF4Tensor.from_bnb(packed, state)
    theirs = quantize_nf4(weight, blocksize, double_quant)
    assert torch.equal(ours.packed, theirs.packed)
    assert torch.equal(dequantize_nf4(ours), dequantize_nf4(theirs))
    again = NF4Tensor.from_bnb(*theirs.to_bnb())
    assert torch.equal(again.absmax, theirs.absmax) and again.double_quant == double_quant


def test_nbytes_counts_codes_and_statistics():
    w = torch.randn(256, 512)
    plain, double = quantize_nf4(w, 64), quantize_nf4(w, 64, double_quant=True)
    blocks = w.numel() // 64
    assert plain.nbytes == w.numel() // 2 + 4 * blocks
    assert double.nbytes == w.numel() // 2 + blocks + 4 * -(-blocks // 256) + 4
    # Double quantization is the ~0.37 bits per weight that QLoRA's paper promises.
    saved_bits = 8 * (plain.nbytes - double.nbytes) / w.numel()
    assert 0.35 < saved_bits < 0.5


@pytest.mark.parametrize(
    "weight, blocksize, expected",
    [
        (torch.ones(64, dtype=torch.int32), 64, "float32, float16 or bfloat16"),
        (torch.randn(64), 100, "power of two from 32 to 4096"),
        (torch.randn(64), True, "power of two from 32 to 4096"),
        (torch.empty(0), 64, "non-empty"),
        (torch.tensor([0.0, float("nan")]), 64, "finite"),
        (torch.tensor([0.0, float("-inf")]), 64, "finite"),
    ],
)
def test_bad_input_names_what_was_expected(weight, blocksize, expected):
    with pytest.raises(ValueError, match=expected):
        quantize_nf4(weight, blocksize)


def test_dequantize_rejects_a_dense_tensor():
    with pytest.raises(TypeError, match="NF4Tensor"):
        dequantize_nf4(torch.randn(4, 4))


def test_no_top_bits_cell_in_the_unit_interval_holds_two_midpoints():
    """The premise of ``_nearest_nf4_code_by_bits``: each cell of floats sharing their top 16 bits meets one midpoint at most."""
    top = torch.arange(-(2**15), 2**15, dtype=torch.int32) * 2**16
    ends = torch.stack([top.view(torch.float32), (top + (2**16 - 1)).view(torch.float32)])
    in_unit = ends.abs().amax(dim=0) <= 1
    codes = nearest_nf4_code(ends.sort(dim=0).values)
    assert ((codes[1] - codes[0])[in_unit] <= 1).all()


def _midpoints_and_their_neighbours() -> torch.Tensor:
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    return torch.cat([mids, mids.nextafter(torch.tensor(2.0)), mids.nextafter(torch.tensor(-2.0)),
                      torch.tensor([-1.0, -0.0, 0.0, 1.0, 1e-45, -1e-45])])


@settings(max_examples=50)
@given(st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=300))
def test_nearest_code_by_bits_equals_the_definition(values):
    normalized = torch.cat([torch.tensor(values, dtype=torch.float32), _midpoints_and_their_neighbours()])
    assert torch.equal(_nearest_nf4_code_by_bits(normalized), nearest_nf4_code(normalized).to(torch.uint8))


@settings(max_examples=30)
@given(weights(), st.booleans())
def test_dequantize_equals_its_definition_bit_for_bit(drawn, double_quant):
    weight, blocksize = drawn  # fp32, fp16 or bf16
    q = quantize_nf4(weight, blocksize, double_quant)
    fast, slow = dequantize_nf4(q), dequantize_nf4_by_definition(q)
    assert fast.dtype == slow.dtype == weight.dtype
    bits = torch.int32 if weight.dtype == torch.float32 else torch.int16
    assert torch.equal(fast.view(bits), slow.view(bits))


@pytest.mark.parametrize("extra", [4096 + 33, 1])
@pytest.mark.parametrize("blocksize", [64, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_quantize_is_bitsandbytes_own_across_chunk_edges(extra, blocksize, dtype):
    """Weights over two CPU chunks, with a short last block and an odd numel, against bitsandbytes itself."""
    import bitsandbytes.functional as F

    numel = 2 * CPU_CHUNK + extra
    weight = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 0.02
    weight[blocksize : 2 * blocksize] = 0  # an all-zero full block
    weight = weight.to(dtype)
    ours = quantize_nf4(weight, blocksize, double_quant=True)
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    assert torch.equal(ours.packed, packed.reshape(-1)) and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(ours), F.dequantize_4bit(packed, state))
