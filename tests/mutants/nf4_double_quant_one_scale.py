"""Mutant: one fp32 scale for the whole weight instead of one per group of 256 blocks (repeated per group)."""

from dataclasses import replace

import torch

from lora_lab.nf4 import _dynamic_lookup
from lora_lab.nf4 import quantize_nf4 as _quantize

EXPECTED_FAILURE = "nf4.double_quant_scales"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    q = _quantize(weight, blocksize, False)
    if not double_quant:
        return q
    code, nearest = _dynamic_lookup()
    offset = q.absmax.mean()
    centred = q.absmax - offset
    scale = centred.abs().max()
    grid = (((centred * (1.0 / scale)).clamp(-1, 1) + 1.0) * 0.5) * 65535.0 + 0.5
    codes = nearest[torch.nan_to_num(grid, nan=0.0).long().clamp(0, 65535)]
    groups = -(-q.absmax.numel() // 256)
    return replace(q, absmax=codes, double_quant=True, absmax_code=code, absmax_scale=scale.repeat(groups),
                   absmax_offset=float(offset))
