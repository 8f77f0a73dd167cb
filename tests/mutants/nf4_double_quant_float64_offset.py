"""Mutant: stores as the double-quant offset the mean of the absmax computed in float64 (bitsandbytes: the fp32 mean)."""

from dataclasses import replace

from lora_lab.nf4 import quantize_absmax
from lora_lab.nf4 import quantize_nf4 as _quantize

EXPECTED_FAILURE = "nf4.double_quant_offset"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    q = _quantize(weight, blocksize, False)
    if not double_quant:
        return q
    codes, code, scales, _ = quantize_absmax(q.absmax)
    offset = float(q.absmax.double().mean())
    return replace(q, absmax=codes, double_quant=True, absmax_code=code, absmax_scale=scales, absmax_offset=offset)
