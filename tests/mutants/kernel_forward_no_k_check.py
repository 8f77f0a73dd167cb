"""Mutant: a learner's fused QLoRA forward (exercise 08 style) that loads one absmax per tile row, as the fast
kernels do, but never checks K % blocksize: for K = 48 and blocksize 32 a tile row straddles two NF4 blocks and is
decoded with the first block's absmax, so the op returns wrong values instead of raising a ValueError.
"""

import torch
import triton
import triton.language as tl

from lora_lab.nf4 import NF4_CODE

EXPECTED_FAILURE = "qlora.rejects_bad_input"
BLOCK_M, BLOCK_N, BLOCK_K = 32, 32, 32


@triton.jit
def qlora_forward_kernel(x_ptr, packed_ptr, levels_ptr, absmax_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, M, N, K, R, scaling,
                         NF4_BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = pid // tl.cdiv(N, BLOCK_N), pid % tl.cdiv(N, BLOCK_N)
    rm, rn = pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        e = rn[:, None] * K + rk[None, :]  # element index in the flattened W (N, K)
        x_mask, w_mask = (rm[:, None] < M) & (rk[None, :] < K), (rn[:, None] < N) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=x_mask, other=0.0)
        byte = tl.load(packed_ptr + e // 2, mask=w_mask, other=0)
        absmax = tl.load(absmax_ptr + (rn * K + k0) // NF4_BLOCKSIZE, mask=rn < N, other=0.0)[:, None]  # one per row
        a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
        code = tl.where(e % 2 == 0, byte >> 4, byte & 0x0F)
        w = tl.load(levels_ptr + code.to(tl.int32)) * absmax
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        xa += tl.dot(x, tl.trans(a), input_precision="ieee")
    b = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
    acc += scaling * tl.dot(xa, tl.trans(b), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    N, K = weight.shape
    if x.shape[-1] != K or lora_A.shape[1] != K or lora_B.shape != (N, lora_A.shape[0]):
        raise ValueError(f"expected x (..., {K}), lora_A (r, {K}), lora_B ({N}, r)")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"expected bias of shape ({N},)")
    if not x.is_floating_point():
        raise TypeError("expected a floating-point x")
    x2d = x.reshape(-1, K).float().contiguous()
    a, b = lora_A.to(x.dtype).float().contiguous(), lora_B.to(x.dtype).float().contiguous()
    bias32 = None if bias is None else bias.to(x.dtype).float().contiguous()
    M, r = x2d.shape[0], a.shape[0]
    y = torch.empty(M, N)
    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N),)
    qlora_forward_kernel[grid](x2d, weight.packed, NF4_CODE, weight.absmax_fp32(), a, b, x2d if bias32 is None else bias32,
                               y, M, N, K, r, float(scaling), NF4_BLOCKSIZE=weight.blocksize, HAS_BIAS=bias is not None,
                               R_PAD=max(16, triton.next_power_of_2(r)),
                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)
