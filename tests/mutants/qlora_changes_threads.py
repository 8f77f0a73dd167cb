"""Mutant: sets torch's thread count for its own matmul and never restores it, slowing or speeding every later op."""

import torch

from lora_lab.lora import qlora_linear as _reference

EXPECTED_FAILURE = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    torch.set_num_threads(torch.get_num_threads() + 1)
    return _reference(x, weight, lora_A, lora_B, scaling, bias)
