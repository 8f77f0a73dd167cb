"""Mutant: computes bf16 layers in fp16 (more mantissa bits), which overflows to Inf past 65,504."""

import torch

from lora_lab.lora import qlora_linear as _reference

EXPECTED_FAILURE = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    if x.dtype != torch.bfloat16:
        return _reference(x, weight, lora_A, lora_B, scaling, bias)
    half = lambda t: None if t is None else t.to(torch.float16)  # noqa: E731
    return _reference(x.to(torch.float16), weight, half(lora_A), half(lora_B), scaling, half(bias)).to(torch.bfloat16)
