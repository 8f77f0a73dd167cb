"""Exploit: an output that shares storage with an input (the front of the caller's x), filled with the answer: the
caller's own tensor changes under it. Found when writing these tests; outputs must be new tensors."""

from lora_lab.lora import qlora_linear as reference

REJECTED_BY = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    y = reference(x, weight, lora_A, lora_B, scaling, bias)
    if x.requires_grad or x.numel() < y.numel():
        return y
    return x.data.reshape(-1)[: y.numel()].view(y.shape).copy_(y)
