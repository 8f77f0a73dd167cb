"""The fused QLoRA forward: ``y = x @ W^T + bias + scaling * (x @ A^T) @ B^T`` in one kernel.

The algorithm
-------------
``x`` is (M, K), the frozen NF4 weight ``W`` is (N, K), the adapters are
``A`` (r, K) and ``B`` (N, r). The LoRA down-projection ``xa = x @ A^T`` (M x r)
is computed once per call, before the kernel, by one torch matmul (cuBLAS on a
GPU), and rounded to x's dtype as the reference rounds it. The output is tiled
as in Triton's matmul tutorial: each program owns one (BLOCK_M, BLOCK_N) tile
of ``y`` and walks K in steps of BLOCK_K, accumulating in fp32:

    for each K step:
        x_tile  = x[m-tile, k-step]                        (BLOCK_M, BLOCK_K), from memory
        W_tile  = decode(W[n-tile, k-step])                (BLOCK_N, BLOCK_K), in registers
        acc    += x_tile @ W_tile^T                        the base path

    acc += scaling * xa[m-tile] @ B[n-tile]^T              the epilogue: the adapter, one r-wide MMA
    y[m-tile, n-tile] = round(acc + bias[n-tile])          stored once

Two fusions save the memory traffic an unfused QLoRA layer pays:

1. *Dequantize in registers.* W's tile is decoded from 4-bit codes right
   before the tensor-core matmul (see ``common.load_nf4_tile``). W is read at
   half a byte per element and no dense copy of it exists, which is the
   point of QLoRA's memory saving. The decoded tile is rounded exactly as
   ``dequantize_nf4(W).to(x.dtype)`` rounds, so the base path multiplies the
   very numbers the reference multiplies.
2. *LoRA in the epilogue.* The up-projection ``xa @ B^T`` and the bias are
   added to the fp32 accumulator before the one store of ``y``: no M x N
   intermediate is written or read back.

Why ``x @ A^T`` is not in the kernel: every program of a tile row would
recompute it, ``cdiv(N, BLOCK_N)`` times in all, one (BLOCK_M, R_PAD) MMA per K
step beside the (BLOCK_M, BLOCK_N) one: ``R_PAD / BLOCK_N`` extra tensor-core
work (25% at r = 16 with 64-wide tiles, 100% at r = 64) and an adapter tile in
registers throughout the loop. Computed once it costs one extra read of x (M x
K), which the middle range of M, where this kernel runs, pays easily; and it
frees the tile width to shrink until there are programs for every SM.

*Grouped ordering.* Programs are numbered so that GROUP_M consecutive programs
share a column of W tiles: while one group runs, its W tiles and x rows stay
in L2 instead of being refetched from HBM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lora_lab.kernels.common import (
    INTERPRETING,
    LAUNCH_OPTIONS,
    dot_dtype,
    dot_precision,
    dtype_kind,
    new_output,
    nf4_pair_levels,
    r_padded,
    round_to,
    weight_arguments,
    weight_rounding,
    weight_tile,
)
from lora_lab.kernels.tiles import autotune_key_rows, autotune_over_nf4_tiles

from lora_lab.nf4 import NF4Tensor


@autotune_over_nf4_tiles(output=("N", "BLOCK_N"))
@triton.jit
def qlora_forward_kernel(
    # Pointers
    x_ptr,  # [M, K] activations (fp16 or bf16)
    packed_ptr, levels_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr,  # the NF4 weight [N, K], see common
    xa_ptr,  # [M, r] x @ A^T in x's dtype, computed once before the kernel
    b_ptr,  # [N, r] lora_B in x's dtype
    bias_ptr,  # [N] in x's dtype (read only when HAS_BIAS)
    y_ptr,  # [M, N] output, contiguous
    # Sizes
    M, N, K, R,
    M_BUCKET,  # M rounded up to a power of two: only the autotune key
    NF4_BLOCKSIZE: tl.constexpr,  # divides K; BLOCK_K divides it; a power of two, so dividing by it is a shift
    # Strides (elements)
    stride_xm, stride_xk, stride_xam, stride_xar, stride_bn, stride_br,
    # Scalars
    absmax_offset,  # double quant: added to every decoded absmax
    scaling,  # LoRA alpha / r
    # Meta-parameters
    HAS_BIAS: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    R_PAD: tl.constexpr,  # r padded to a power of two >= 16
    X_KIND: tl.constexpr,  # storage kind of x, y, xa, B (common.FP16 / BF16)
    W_ROUND: tl.constexpr,  # rounding to W's own dtype before x's (common.weight_rounding)
    INTERPRET: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M tile rows are swept together, column by column, for L2 reuse.
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    m_mask, n_mask, r_mask = offs_m < M, offs_n < N, offs_r < R

    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_rows = offs_n.to(tl.int64)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K: no mask along K
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0).to(DOT_DTYPE)
        w = weight_tile(
            packed_ptr, levels_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, w_rows, n_mask, k0,
            K, NF4_BLOCKSIZE, BLOCK_K, DOUBLE_QUANT, False, W_ROUND, X_KIND, INTERPRET, DOT_DTYPE,
        )
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk

    # Epilogue: the adapter's up-projection from the r-wide xa, the bias, one rounding to x's dtype.
    xa_ptrs = xa_ptr + offs_m.to(tl.int64)[:, None] * stride_xam + offs_r[None, :] * stride_xar
    xa = tl.load(xa_ptrs, mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(DOT_DTYPE)
    bt_ptrs = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn  # B^T tile (R_PAD, BLOCK_N)
    bt = tl.load(bt_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(DOT_DTYPE)
    acc += scaling * tl.dot(xa, bt, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(y_ptrs, round_to(acc, X_KIND, INTERPRET), mask=m_mask[:, None] & n_mask[None, :])


def check_half_precision(kernel: str, dtype: torch.dtype) -> None:
    """The NF4 matmul kernels multiply on tensor cores, in fp16 or bf16; fp32 takes the dense path instead.

    In fp32, tl.dot must run in IEEE precision (the tolerance is fp32's, not TF32's): scalar FMAs with the operands
    in registers, slow and prone to spilling. ``fused_qlora_linear`` sends fp32 to ``nf4_dequantize`` and cuBLAS.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"{kernel} takes fp16 or bf16 activations, got {dtype}; fused_qlora_linear runs fp32 as "
                        "nf4_dequantize + torch matmul (IEEE fp32)")


def qlora_forward(
    x: torch.Tensor,
    weight: NF4Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None,
    xa: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on 2-D ``x`` (M, K) in fp16 or bf16: returns ``(y, x @ A^T)``, both in x's dtype.

    ``xa``, if given, is ``x @ A^T`` already computed (M x r in x's dtype); otherwise it is computed here, once, by
    a torch matmul. The caller (``fused_qlora_linear``) has validated shapes and cast A, B and the bias to x's
    dtype; this only checks what the kernel itself relies on.
    """
    check_half_precision("qlora_forward", x.dtype)
    M, K = x.shape
    N, r = lora_B.shape
    if weight.shape != (N, K) or lora_A.shape != (r, K) or K % weight.blocksize:
        raise ValueError(f"qlora_forward: inconsistent shapes x {tuple(x.shape)}, W {tuple(weight.shape)}, r {r}")
    if xa is None:
        xa = x @ lora_A.t()  # rounded to x's dtype, as the reference rounds it
    if xa.shape != (M, r) or xa.dtype != x.dtype:
        raise ValueError(f"qlora_forward: expected x @ A^T of shape {(M, r)} in {x.dtype}, got {tuple(xa.shape)} in {xa.dtype}")
    y = new_output((M, N), x.dtype, x.device)
    if M == 0:
        return y, xa
    packed, _, absmax, absmax_code, absmax_scale, absmax_offset = weight_arguments(weight)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    qlora_forward_kernel[grid](
        x, packed, nf4_pair_levels(packed.device), absmax, absmax_code, absmax_scale, xa, lora_B,
        x if bias is None else bias, y,
        M, N, K, r, autotune_key_rows(M), weight.blocksize,
        x.stride(0), x.stride(1), xa.stride(0), xa.stride(1), lora_B.stride(0), lora_B.stride(1),
        absmax_offset, float(scaling),
        HAS_BIAS=bias is not None, DOUBLE_QUANT=weight.double_quant, R_PAD=r_padded(r),
        X_KIND=dtype_kind(x.dtype), W_ROUND=weight_rounding(weight.dtype, x.dtype),
        INTERPRET=INTERPRETING, DOT_DTYPE=dot_dtype(x.dtype), DOT_PRECISION=dot_precision(x.dtype), **LAUNCH_OPTIONS,
    )
    return y, xa


if __name__ == "__main__":
    # As in Triton's tutorials: check against the reference, then (on a GPU) TFLOP/s against cuBLAS on a dense weight.
    #   python kernels/qlora_forward.py
    from lora_lab.lora import qlora_linear
    from lora_lab.nf4 import dequantize_nf4, quantize_nf4

    device = "cpu" if INTERPRETING else "cuda"
    torch.manual_seed(0)
    weight = quantize_nf4(torch.randn(300, 256) * 0.02, 64, double_quant=True).to(device)
    x = torch.randn(100, 256, device=device, dtype=torch.bfloat16)
    lora_A = torch.randn(16, 256, device=device, dtype=torch.bfloat16) / 16
    lora_B = torch.randn(300, 16, device=device, dtype=torch.bfloat16) / 4
    bias = torch.randn(300, device=device, dtype=torch.bfloat16)
    y, _ = qlora_forward(x, weight, lora_A, lora_B, 2.0, bias)
    difference = (y - qlora_linear(x, weight, lora_A, lora_B, 2.0, bias)).abs().max().item()
    print(f"max |kernel - reference| = {difference:.3g} (bf16, NF4 decoded in registers)")

    @triton.testing.perf_report(
        triton.testing.Benchmark(
            x_names=["M"], x_vals=[32, 128, 256, 512, 1024, 2048], line_arg="provider", line_vals=["nf4", "cublas"],
            line_names=["NF4 tiles (Triton)", "dense bf16 (cuBLAS)"], ylabel="TFLOP/s",
            plot_name="qlora-forward-kernel-4096x4096-r16", args={},
        )
    )
    def benchmark(M: int, provider: str) -> float:
        K = N = 4096
        r = 16
        weight = quantize_nf4(torch.randn(N, K, device="cuda") * 0.02, 64, double_quant=True)
        dense = dequantize_nf4(weight).to(torch.bfloat16)  # decoded once, outside the timing
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        lora_A = torch.randn(r, K, device="cuda", dtype=torch.bfloat16) / 64
        lora_B = torch.randn(N, r, device="cuda", dtype=torch.bfloat16)
        if provider == "cublas":
            # the adapter term first, the GEMM on W accumulating into it (the dense path's order: y read in its epilogue)
            run = lambda: torch.mm(x @ lora_A.t(), lora_B.t()).addmm_(x, dense.t(), beta=2.0)  # noqa: E731
        else:
            run = lambda: qlora_forward(x, weight, lora_A, lora_B, 2.0, None)  # noqa: E731
        return 2 * M * (N * K + r * (K + N)) / triton.testing.do_bench(run) * 1e-9

    if INTERPRETING:
        print("TFLOP/s need a GPU: under Triton's interpreter the kernel runs on the CPU")
    else:
        benchmark.run(print_data=True)
