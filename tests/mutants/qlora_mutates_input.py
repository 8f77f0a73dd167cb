"""Mutant: scales x in place to save memory, silently corrupting the caller's activations."""

from lora_lab.lora import qlora_linear as _reference

EXPECTED_FAILURE = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    y = _reference(x, weight, lora_A, lora_B, scaling, bias)
    if not x.requires_grad:
        x.mul_(1.0 + 2.0**-6)
    return y
