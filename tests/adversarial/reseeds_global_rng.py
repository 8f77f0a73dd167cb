"""Exploit: state left behind. The op reseeds torch's global RNG (so a caller's later draws repeat) while computing the
right answer. The target's process snapshots the global state around every call."""

import torch

from lora_lab.lora import qlora_linear as reference

REJECTED_BY = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    torch.manual_seed(0)
    return reference(x, weight, lora_A, lora_B, scaling, bias)
