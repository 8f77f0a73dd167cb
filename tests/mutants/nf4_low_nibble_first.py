"""Mutant: packs element 2i into the LOW nibble (the most common NF4 packing slip)."""

from lora_lab.nf4 import NF4Tensor
from lora_lab.nf4 import quantize_nf4 as _quantize

EXPECTED_FAILURE = "nf4.bytes_match_bitsandbytes"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    q = _quantize(weight, blocksize, double_quant)
    swapped = ((q.packed & 0x0F) << 4) | (q.packed >> 4)
    return NF4Tensor(swapped, *[getattr(q, f) for f in ("absmax", "blocksize", "shape", "dtype", "double_quant",
                                                        "absmax_code", "absmax_scale", "absmax_offset")])
