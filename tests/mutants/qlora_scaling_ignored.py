"""Mutant: adds the adapter path without multiplying by `scaling` (alpha/r)."""

from lora_lab.lora import base_path, lora_path

EXPECTED_FAILURE = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    return base_path(x, weight, bias) + lora_path(x, lora_A, lora_B, 1.0)
