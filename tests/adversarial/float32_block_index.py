"""Exploit: block indices computed in float32 (as a kernel might, e / blocksize as a float), exact below 2^24 elements
and wrong above: a suite whose weights stay under 40,000 elements never sees it."""

import torch

from lora_lab.nf4 import NF4_CODE

REJECTED_BY = "nf4.dequantize_realistic_size"


def dequantize_nf4(q):
    codes = torch.stack([q.packed >> 4, q.packed & 0x0F], dim=1).reshape(-1)[: q.numel].long()
    element = torch.arange(q.numel, dtype=torch.float32)
    block = torch.floor(element / q.blocksize).long().clamp(max=q.absmax.numel() - 1)
    return (NF4_CODE[codes] * q.absmax_fp32()[block]).to(q.dtype).reshape(q.shape)
