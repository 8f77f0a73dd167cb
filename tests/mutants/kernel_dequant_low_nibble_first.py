"""Mutant: a Triton NF4 dequantize kernel that reads element 2i from the LOW nibble of byte i."""

import torch
import triton
import triton.language as tl
from lora_lab.kernels.common import INTERPRETING, LAUNCH_OPTIONS, dtype_kind, load_absmax, round_to, weight_arguments

EXPECTED_FAILURE = "nf4.dequantize_matches_bitsandbytes"


@triton.jit
def _dequantize_low_nibble_first(
    packed_ptr, levels_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, out_ptr, numel,
    BLOCKSIZE: tl.constexpr, OUT_KIND: tl.constexpr, DOUBLE_QUANT: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    packed = tl.load(packed_ptr + offs // 2, mask=mask, other=0)
    codes = (packed >> ((offs % 2) * 4)) & 0x0F  # the bug: even elements take the low nibble
    absmax = load_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, offs // BLOCKSIZE, mask, DOUBLE_QUANT)
    values = tl.load(levels_ptr + codes.to(tl.int32)) * absmax
    tl.store(out_ptr + offs, round_to(values, OUT_KIND, INTERPRET), mask=mask)


def dequantize_nf4(q):
    packed, levels, absmax, absmax_code, absmax_scale, absmax_offset = weight_arguments(q)
    out = torch.empty(tuple(q.shape), dtype=q.dtype, device=packed.device)
    _dequantize_low_nibble_first[(triton.cdiv(q.numel, 1024),)](
        packed, levels, absmax, absmax_code, absmax_scale, absmax_offset, out, q.numel,
        BLOCKSIZE=q.blocksize, OUT_KIND=dtype_kind(q.dtype), DOUBLE_QUANT=q.double_quant,
        INTERPRET=INTERPRETING, BLOCK=1024, **LAUNCH_OPTIONS,
    )
    return out
