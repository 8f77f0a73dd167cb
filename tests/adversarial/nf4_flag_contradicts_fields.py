"""Exploit: the right bytes and fp32 absmax, in an NF4Tensor that claims double_quant=True: every reader that trusts the
flag misreads the fields. NF4 weights cross processes as their fields, as they came."""

import dataclasses

from lora_lab.nf4 import quantize_nf4 as reference

REJECTED_BY = "nf4.bytes_match_bitsandbytes"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    return dataclasses.replace(reference(weight, blocksize, double_quant), double_quant=True)
