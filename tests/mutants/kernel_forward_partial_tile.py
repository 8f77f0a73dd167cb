"""Mutant: the fused forward launched with a floor-divided grid, M // BLOCK_M, so the last partial row tile never runs."""

import torch
import triton
from lora_lab.kernels.common import (
    INTERPRETING,
    LAUNCH_OPTIONS,
    dot_dtype,
    dot_precision,
    dtype_kind,
    r_padded,
    weight_arguments,
    weight_rounding,
)
from lora_lab.kernels.qlora_forward import qlora_forward_kernel
from lora_lab.kernels.tiles import autotune_key_rows

EXPECTED_FAILURE = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    K, (N, r) = x.shape[-1], lora_B.shape
    x2d, a, b = x.reshape(-1, K), lora_A.to(x.dtype).contiguous(), lora_B.to(x.dtype).contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    M = x2d.shape[0]
    y, xa = torch.zeros(M, N, dtype=x.dtype), x2d @ a.t()
    packed, levels, absmax, absmax_code, absmax_scale, absmax_offset = weight_arguments(weight)
    grid = lambda meta: ((M // meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # the bug: floor, not cdiv
    qlora_forward_kernel[grid](
        x2d, packed, levels, absmax, absmax_code, absmax_scale, xa, b, x2d if bias is None else bias, y,
        M, N, K, r, autotune_key_rows(M), weight.blocksize,
        x2d.stride(0), x2d.stride(1), xa.stride(0), xa.stride(1), b.stride(0), b.stride(1), absmax_offset, float(scaling),
        HAS_BIAS=bias is not None, DOUBLE_QUANT=weight.double_quant, R_PAD=r_padded(r), X_KIND=dtype_kind(x.dtype),
        W_ROUND=weight_rounding(weight.dtype, x.dtype), INTERPRET=INTERPRETING, DOT_DTYPE=dot_dtype(x.dtype),
        DOT_PRECISION=dot_precision(x.dtype), **LAUNCH_OPTIONS,
    )
    return y.reshape(*x.shape[:-1], N)
