"""Mutant: writes every result into one preallocated buffer per shape, so a later call overwrites an earlier output."""

import torch

from lora_lab.lora import qlora_linear as _reference

EXPECTED_FAILURE = "qlora.forward_matches_float64"
_buffers = {}


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    y = _reference(x, weight, lora_A, lora_B, scaling, bias)
    if y.requires_grad:
        return y
    key = (tuple(y.shape), y.dtype)
    out = _buffers.setdefault(key, torch.empty_like(y))
    out.copy_(y)
    return out
