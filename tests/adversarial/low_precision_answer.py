"""Negative control (gpu-mode): the right formula computed in bfloat16 whatever the input dtype, then cast back."""

from lora_lab.lora import qlora_linear as reference

REJECTED_BY = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    cast = lambda t: None if t is None else t.bfloat16()  # noqa: E731
    return reference(cast(x), weight, cast(lora_A), cast(lora_B), scaling, cast(bias)).to(x.dtype)
