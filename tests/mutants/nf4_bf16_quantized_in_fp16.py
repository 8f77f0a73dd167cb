"""Mutant: quantizes half-precision weights after a cast to fp16, so a bf16 weight past 65,504 becomes Inf."""

import torch

from lora_lab.nf4 import quantize_nf4 as _reference

EXPECTED_FAILURE = "nf4.bytes_match_bitsandbytes"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    if weight.dtype != torch.bfloat16:
        return _reference(weight, blocksize, double_quant)
    q = _reference(weight.to(torch.float16).float(), blocksize, double_quant)
    return type(q)(q.packed, q.absmax, q.blocksize, weight.shape, weight.dtype, q.double_quant,
                   q.absmax_code, q.absmax_scale, q.absmax_offset)
