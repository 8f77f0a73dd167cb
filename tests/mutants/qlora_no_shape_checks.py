"""Mutant: no input validation; a wrong-shaped bias is broadcast instead of refused."""

from lora_lab.lora import base_path, lora_path

EXPECTED_FAILURE = "qlora.rejects_bad_input"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    y = base_path(x, weight) + lora_path(x, lora_A, lora_B, scaling)
    return y if bias is None else y + bias.sum()
