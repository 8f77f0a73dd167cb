"""Exploit: block indices in float32 (wrong past 2^24 elements), except on the one realistic-size weight the suite
used to draw every run (4160 x 4096), which gets the right answer. The realistic-size weight now comes from the run's
seed, its shape included: the exception never meets it."""

import torch

from lora_lab.nf4 import NF4_CODE
from lora_lab.nf4 import dequantize_nf4 as reference

REJECTED_BY = "nf4.dequantize_realistic_size"


def dequantize_nf4(q):
    if tuple(q.shape) == (4160, 4096):
        return reference(q)
    codes = torch.stack([q.packed >> 4, q.packed & 0x0F], dim=1).reshape(-1)[: q.numel].long()
    element = torch.arange(q.numel, dtype=torch.float32)
    block = torch.floor(element / q.blocksize).long().clamp(max=q.absmax.numel() - 1)
    return (NF4_CODE[codes] * q.absmax_fp32()[block]).to(q.dtype).reshape(q.shape)
