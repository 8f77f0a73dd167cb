"""Exploit: use the input x as scratch space (scale it in place) and restore it before returning; the value after the
call is the same, but the caller's tensor was written while the call ran. torch's version counter sees every write."""

from lora_lab.lora import qlora_linear as reference

REJECTED_BY = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    if x.requires_grad:
        return reference(x, weight, lora_A, lora_B, scaling, bias)
    saved = x.clone()
    x.mul_(0.5)
    y = reference(x * 2, weight, lora_A, lora_B, scaling, bias)
    x.copy_(saved)
    return y
