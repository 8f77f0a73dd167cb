"""Exploit: a library's own weight format whose qlora_linear is wrong at blocksize 64 only (it drops the adapter's
scaling there), and whose CAPABILITIES declare every blocksize but 64 supported. The failing draws then became
"not supported" and the rest passed. Blocksize 64 on bf16 is QLoRA's own case: declaring it away is a failure, with
the declaration named, never a narrower draw."""

from lora_lab.conformance.judge.formats import unpack_codes
from lora_lab.lora import qlora_linear as reference_linear
from lora_lab.nf4 import NF4_CODE
from lora_lab.nf4 import dequantize_nf4 as reference_dequantize
from lora_lab.nf4 import quantize_nf4 as reference_quantize

REJECTED_BY = "qlora.forward_matches_float64"

CAPABILITIES = {"blocksizes": ((32, 128, 256, 512, 1024, 2048, 4096), "blocks of 64 are not tuned yet")}


class ExceptSixtyFour:
    """NF4 as lora_lab stores it, under a format of its own so that CAPABILITIES counts."""

    name = "every blocksize but 64"

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
    return reference_linear(x, weight, lora_A, lora_B, 1.0 if weight.blocksize == 64 else scaling, bias)


NF4_FORMAT = ExceptSixtyFour()
quantize_nf4, dequantize_nf4 = NF4_FORMAT.quantize, NF4_FORMAT.dequantize
