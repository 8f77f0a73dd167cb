"""Exploit or accident: the op reads address 0 (a segmentation fault, as a kernel reading out of bounds would).
The check becomes an error naming the call, and the report still comes out."""

import ctypes

REJECTED_BY = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    return ctypes.string_at(0, 64)
