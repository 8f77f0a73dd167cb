"""Mutant: looks up each element's absmax by a float32 block index, exact only below 2^24 elements."""

import torch

from lora_lab.nf4 import NF4_CODE, unpack_codes

EXPECTED_FAILURE = "nf4.dequantize_realistic_size"


def dequantize_nf4(q):
    n = q.numel
    block = (torch.arange(n, dtype=torch.float32) / q.blocksize).floor().long().clamp(max=q.absmax.numel() - 1)
    values = NF4_CODE[unpack_codes(q.packed, n).long()] * q.absmax_fp32()[block]
    return values.to(q.dtype).reshape(q.shape)
