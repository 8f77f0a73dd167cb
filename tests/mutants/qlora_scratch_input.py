"""Mutant: scales x in place as scratch space and restores it before returning; the caller's tensor was still written."""

from lora_lab.lora import qlora_linear as _reference

EXPECTED_FAILURE = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    if x.requires_grad:
        return _reference(x, weight, lora_A, lora_B, scaling, bias)
    saved = x.clone()
    x.mul_(0.5)
    y = _reference(x * 2, weight, lora_A, lora_B, scaling, bias)
    x.copy_(saved)
    return y
