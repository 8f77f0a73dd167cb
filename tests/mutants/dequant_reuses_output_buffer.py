"""Mutant: dequantizes into one buffer per shape and returns it, so the next call overwrites the caller's weight."""

import torch

from lora_lab.nf4 import dequantize_nf4 as _reference

EXPECTED_FAILURE = "nf4.dequantize_matches_bitsandbytes"
_buffers = {}


def dequantize_nf4(q):
    w = _reference(q)
    out = _buffers.setdefault((tuple(w.shape), w.dtype), torch.empty_like(w))
    out.copy_(w)
    return out
