"""Mutant: stores 1e-38 for every all-zero last block; bitsandbytes floors only a *short* one and stores 0 for a full one."""

from dataclasses import replace

from lora_lab.nf4 import _blockwise_absmax
from lora_lab.nf4 import quantize_nf4 as _quantize

EXPECTED_FAILURE = "nf4.bytes_match_bitsandbytes"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    q = _quantize(weight, blocksize, False)
    absmax = _blockwise_absmax(weight.reshape(-1).float(), blocksize)
    absmax[-1] = absmax[-1].clamp(min=1e-38)
    return replace(q, absmax=absmax)
