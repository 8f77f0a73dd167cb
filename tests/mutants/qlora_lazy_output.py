"""Mutant: returns an uninitialised tensor at once and fills in the answer from a background thread ("lazy" output)."""

import threading
import time

import torch

from lora_lab.lora import qlora_linear as _reference

EXPECTED_FAILURE = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    y = _reference(x, weight, lora_A, lora_B, scaling, bias)
    if y.requires_grad:
        return y
    out = torch.zeros_like(y)

    def fill():
        time.sleep(0.2)
        out.copy_(y)

    threading.Thread(target=fill, daemon=True).start()
    return out
