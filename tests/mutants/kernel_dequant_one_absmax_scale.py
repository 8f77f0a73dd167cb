"""Mutant: a learner's Triton dequantize that decodes double quantization in the kernel (the stretch) but loads one
absmax_scale for every block: right up to 256 blocks, wrong from the second group of 256 on."""

import torch
import triton
import triton.language as tl

from lora_lab.nf4 import NF4_CODE

EXPECTED_FAILURE = "nf4.dequantize_matches_bitsandbytes"
BLOCK = 1024


@triton.jit
def _dequantize(packed_ptr, levels_ptr, absmax_ptr, code_ptr, scale_ptr, offset, out_ptr, numel,
                BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0)
    code = tl.where(offs % 2 == 0, byte >> 4, byte & 0x0F).to(tl.int32)
    block = offs // BLOCKSIZE
    if DOUBLE_QUANT:
        absmax_code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(scale_ptr)  # the bug: absmax_scale[0] for every block, not absmax_scale[block // 256]
        absmax = tl.load(code_ptr + absmax_code, mask=mask, other=0.0) * scale + offset
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    values = tl.load(levels_ptr + code, mask=mask, other=0.0) * absmax
    tl.store(out_ptr + offs, values, mask=mask)


def dequantize_nf4(q):
    out = torch.empty(q.numel, dtype=torch.float32)
    if q.double_quant:
        statistics = (q.absmax, q.absmax_code, q.absmax_scale, float(q.absmax_offset))
    else:
        statistics = (q.absmax, NF4_CODE, NF4_CODE, 0.0)  # the two maps are not read without double quant
    _dequantize[(triton.cdiv(q.numel, BLOCK),)](q.packed, NF4_CODE, *statistics, out, q.numel, BLOCKSIZE=q.blocksize,
                                                DOUBLE_QUANT=q.double_quant, BLOCK=BLOCK)
    return out.to(q.dtype).reshape(q.shape)
