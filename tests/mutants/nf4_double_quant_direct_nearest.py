"""Mutant: picks the dynamic-map level nearest to the normalized value itself, skipping bitsandbytes' 65,536-point grid."""

from dataclasses import replace

import torch

from lora_lab.nf4 import _blockwise_absmax, dynamic_map
from lora_lab.nf4 import quantize_nf4 as _quantize

EXPECTED_FAILURE = "nf4.double_quant_grid_table"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    q = _quantize(weight, blocksize, False)
    if not double_quant:
        return q
    code = dynamic_map()
    offset = q.absmax.mean()
    centred = q.absmax - offset
    scales = _blockwise_absmax(centred, 256)
    normalized = centred * (1.0 / scales.repeat_interleave(256)[: centred.numel()])
    codes = (torch.nan_to_num(normalized, nan=-1.0)[:, None] - code[None, :]).abs().argmin(1).to(torch.uint8)
    return replace(q, absmax=codes, double_quant=True, absmax_code=code, absmax_scale=scales, absmax_offset=float(offset))
