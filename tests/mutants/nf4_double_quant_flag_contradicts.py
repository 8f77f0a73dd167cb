"""Mutant: the right bytes and fp32 absmax, but the NF4Tensor claims double_quant=True, so readers misread its fields."""

import dataclasses

from lora_lab.nf4 import quantize_nf4 as _reference

EXPECTED_FAILURE = "nf4.bytes_match_bitsandbytes"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    return dataclasses.replace(_reference(weight, blocksize, double_quant), double_quant=True)
