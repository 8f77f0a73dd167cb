"""Mutant: centres each group of 256 absmax values on its own mean, but stores the global mean as the offset."""

from dataclasses import replace

import torch

from lora_lab.nf4 import _dynamic_lookup
from lora_lab.nf4 import quantize_nf4 as _quantize

EXPECTED_FAILURE = "nf4.double_quant_codes"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    q = _quantize(weight, blocksize, False)
    if not double_quant:
        return q
    code, nearest = _dynamic_lookup()
    absmax = q.absmax
    codes, scales = [], []
    for group in absmax.split(256):
        centred = group - group.mean()
        scale = centred.abs().max()
        grid = (((centred * (1.0 / scale)).clamp(-1, 1) + 1.0) * 0.5) * 65535.0 + 0.5
        codes.append(nearest[torch.nan_to_num(grid, nan=0.0).long().clamp(0, 65535)])
        scales.append(scale)
    return replace(q, absmax=torch.cat(codes), double_quant=True, absmax_code=code, absmax_scale=torch.stack(scales),
                   absmax_offset=float(absmax.mean()))
