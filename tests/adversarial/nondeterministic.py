"""Exploit: one-ulp noise seeded from the clock (as a racy reduction would give): within tolerance, never the same bits
twice. qlora_linear promises a bit-identical forward for the same inputs."""

import time

import torch

from lora_lab.lora import qlora_linear as reference

REJECTED_BY = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    y = reference(x, weight, lora_A, lora_B, scaling, bias)
    g = torch.Generator().manual_seed(time.perf_counter_ns())
    ulp = torch.finfo(y.dtype).eps * y.detach().abs()
    return y + (torch.randint(-1, 2, y.shape, generator=g) * ulp).to(y.dtype)
