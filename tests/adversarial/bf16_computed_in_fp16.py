"""Exploit: bf16 layers computed in fp16 (more mantissa bits, so small values look better), which overflows to Inf past
65,504; a suite that draws only small values never sees it."""

import torch

from lora_lab.lora import qlora_linear as reference

REJECTED_BY = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    if x.dtype != torch.bfloat16:
        return reference(x, weight, lora_A, lora_B, scaling, bias)
    half = lambda t: None if t is None else t.to(torch.float16)  # noqa: E731
    return reference(x.to(torch.float16), weight, half(lora_A), half(lora_B), scaling, half(bias)).to(torch.bfloat16)
