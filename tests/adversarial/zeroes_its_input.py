"""Exploit (KernelBench): compute the answer, then zero the input so that a verifier which recomputes its expected
value from the same tensors afterwards compares zeros with zeros. Inputs are copied and checked after every call."""

from lora_lab.lora import qlora_linear as reference

REJECTED_BY = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    y = reference(x, weight, lora_A, lora_B, scaling, bias)
    x.data.zero_()
    return y
