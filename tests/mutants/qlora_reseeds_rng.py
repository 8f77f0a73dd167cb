"""Mutant: reseeds torch's global RNG on every call ("for reproducibility"), resetting the caller's random stream."""

import torch

from lora_lab.lora import qlora_linear as _reference

EXPECTED_FAILURE = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    torch.manual_seed(0)
    return _reference(x, weight, lora_A, lora_B, scaling, bias)
