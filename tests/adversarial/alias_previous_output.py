"""Exploit: every call writes its answer into one reused buffer and returns a view of it, so an earlier output changes
when the next call runs. The target's process checks the previous outputs around every call."""

import torch

from lora_lab.lora import qlora_linear as reference

REJECTED_BY = "qlora.forward_matches_float64"
_buffer = torch.empty(0)


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    global _buffer
    y = reference(x, weight, lora_A, lora_B, scaling, bias)
    if _buffer.numel() < y.numel() or _buffer.dtype != y.dtype:
        _buffer = torch.empty(max(y.numel(), 1 << 16), dtype=y.dtype)
    out = _buffer[: y.numel()].view(y.shape)
    out.copy_(y)
    return out
