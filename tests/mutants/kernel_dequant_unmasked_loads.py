"""Mutant: a learner's Triton dequantize whose loads have no mask (only the store does): under the interpreter every
value is right, on a GPU the last program reads past packed and absmax."""

import torch
import triton
import triton.language as tl

from lora_lab.nf4 import NF4_CODE

EXPECTED_FAILURE = "bounds.dequantize_nf4"
BLOCK = 256


@triton.jit
def _dequantize_unmasked(packed_ptr, levels_ptr, absmax_ptr, out_ptr, numel, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    byte = tl.load(packed_ptr + offs // 2)  # the bug: no mask, the last program reads past the last byte
    code = tl.where(offs % 2 == 0, byte >> 4, byte & 0x0F)
    absmax = tl.load(absmax_ptr + offs // BLOCKSIZE)  # and past the last absmax
    values = tl.load(levels_ptr + code.to(tl.int32)) * absmax
    tl.store(out_ptr + offs, values, mask=offs < numel)


def dequantize_nf4(q):
    out = torch.empty(q.numel, dtype=torch.float32)
    _dequantize_unmasked[(triton.cdiv(q.numel, BLOCK),)](q.packed, NF4_CODE, q.absmax_fp32(), out, q.numel,
                                                         BLOCKSIZE=q.blocksize, BLOCK=BLOCK)
    return out.to(q.dtype).reshape(q.shape)
