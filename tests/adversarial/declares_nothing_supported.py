"""Exploit: a library's own weight format (correct NF4, stored as lora_lab's NF4Tensor) whose CAPABILITIES declare that
it supports no blocksize, no dtype and no double-quant setting. Every check then had nothing to draw and reported
"not supported": "0 passed, 20 not supported" and exit 0, a pass by declaring. A format must support QLoRA's own case
(NF4, blocksize 64, bf16) to pass anything, so the declaration itself fails the check."""

from lora_lab.conformance.judge.formats import unpack_codes
from lora_lab.lora import qlora_linear as reference_linear
from lora_lab.nf4 import NF4_CODE
from lora_lab.nf4 import dequantize_nf4 as reference_dequantize
from lora_lab.nf4 import quantize_nf4 as reference_quantize

REJECTED_BY = "qlora.forward_matches_float64"

CAPABILITIES = {
    "blocksizes": ((), "this library chooses its own blocks"),
    "dtypes": ((), "this library chooses its own dtypes"),
    "double_quant": ((), "this library chooses its own statistics"),
}


class DeclaredFormat:
    """NF4 as lora_lab stores it, under a format of its own so that CAPABILITIES counts."""

    name = "declares nothing"

    @staticmethod
    def quantize(weight, blocksize=64, double_quant=False):
        return reference_quantize(weight, blocksize, double_quant)

    @staticmethod
    def dequantize(q):
        return reference_dequantize(q)

    @staticmethod
    def codes(q):
        return unpack_codes(q.packed, q.numel)

    @staticmethod
    def levels(q):
        return NF4_CODE

    @staticmethod
    def absmax(q):
        return q.absmax_fp32()


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    return reference_linear(x, weight, lora_A, lora_B, scaling, bias)


NF4_FORMAT = DeclaredFormat()
quantize_nf4, dequantize_nf4 = NF4_FORMAT.quantize, NF4_FORMAT.dequantize
