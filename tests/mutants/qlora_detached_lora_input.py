"""Mutant: feeds the adapter path a detached x, so dX misses the s·(dY·B)·A term (A and B still learn)."""

from lora_lab.lora import base_path, lora_path
from lora_lab.operands import check_qlora_operands

EXPECTED_FAILURE = "qlora.matches_peft_bitsandbytes"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    check_qlora_operands(x, weight, lora_A, lora_B, bias, scaling)
    return base_path(x, weight, bias) + lora_path(x.detach(), lora_A, lora_B, scaling)
