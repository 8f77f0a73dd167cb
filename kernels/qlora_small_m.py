"""The QLoRA forward for a few rows (M <= 16, decoding): split-K over the NF4 weight, so every SM has work.

The algorithm
-------------
At small M (one token per sequence while generating, M = batch) the layer is a
matrix-vector product: ``y = x @ W^T`` reads all of W (N x K, half a byte per
weight) to do 2·M·N·K FLOPs, so its time is W's bytes over HBM bandwidth, if
enough programs stream W at once. The fused forward kernel tiles only the
output: at M <= 16 that is ``cdiv(N, BLOCK_N)`` programs (32 for N = 4096 and
its default BLOCK_N = 128), too few for 132 SMs to saturate HBM.

So this kernel also splits K, as gemlite's and bitsandbytes' GEMV kernels do:
program ``(n, s)`` owns the (16, BLOCK_N) tile ``n`` of the output and the
``s``-th of ``SPLIT_K`` equal slices of K, and writes its fp32 partial sum to a
workspace of shape (SPLIT_K, M, N):

    for each K step in slice s:
        W_tile   = decode(W[n-tile, k-step])         (BLOCK_N, BLOCK_K), in registers
        partial += x[:, k-step] @ W_tile^T          (16, BLOCK_N), fp32

The host sums the slices in a fixed order (deterministic, unlike atomics) and
adds the LoRA path, ``scaling * round(x @ A^T) @ B^T``, and the bias: at M <= 16
those are r-wide products, tiny next to reading W. ``SPLIT_K`` is chosen so
that ``cdiv(N, BLOCK_N) * SPLIT_K`` covers the SMs a few times over.
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
    load_nf4_tile,
    new_output,
    nf4_pair_levels,
    weight_arguments,
    weight_operand,
    weight_rounding,
)

from lora_lab.nf4 import NF4Tensor

SMALL_M = 16  # the most rows this kernel takes: one 16-row MMA tile
# Programs to aim for: H100/H200 have 132 SMs, A100 108; a few programs per SM hide the latency of each one's loads.
TARGET_PROGRAMS = 4 * 132
# (BLOCK_N, BLOCK_K, num_warps, num_stages). On a GPU 16 x 128 tiles with 4 warps: the K loop's fixed work per step
# (x tile, addresses, pipeline bookkeeping) spread over 64 weights a thread, 8.0 SASS instructions per weight on
# sm_90a where 16 x 64 took 12.9 (compile_check --sass); no spill on sm_90a or sm_80. The interpreter pays per program.
GPU_TILE, INTERPRETER_TILE = (128, 64, 4, 3), (64, 64, 4, 1)
BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = INTERPRETER_TILE if INTERPRETING else GPU_TILE


@triton.jit
def qlora_small_m_kernel(
    # Pointers
    x_ptr,  # [M, K] activations (x's dtype), M <= BLOCK_M
    packed_ptr, levels_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr,  # the NF4 weight [N, K], see common
    partial_ptr,  # [SPLIT_K, M, N] fp32 output: one partial x @ W^T per K slice, contiguous
    # Sizes
    M, N, K,
    K_PER_SPLIT,  # elements of K each program reduces: a multiple of BLOCK_K that divides K
    NF4_BLOCKSIZE: tl.constexpr,  # divides K; BLOCK_K divides it; a power of two, so dividing by it is a shift
    stride_xm, stride_xk,
    absmax_offset,  # double quant: added to every decoded absmax
    # Meta-parameters
    DOUBLE_QUANT: tl.constexpr, X_KIND: tl.constexpr, W_ROUND: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    k_begin = pid_s * K_PER_SPLIT
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_begin + offs_k)[None, :] * stride_xk
    w_rows = offs_n.to(tl.int64)
    blocks_per_row = K // NF4_BLOCKSIZE

    partial = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(k_begin, k_begin + K_PER_SPLIT, BLOCK_K):  # SPLIT_K divides K's steps: every slice is full
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0).to(DOT_DTYPE)
        w = load_nf4_tile(
            packed_ptr, levels_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset,
            w_rows * K + k0, w_rows * blocks_per_row + k0 // NF4_BLOCKSIZE, n_mask, BLOCK_K, DOUBLE_QUANT,
        )
        w = weight_operand(w, W_ROUND, X_KIND, INTERPRET)
        partial = tl.dot(x, tl.trans(w), partial, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk

    out_ptrs = partial_ptr + (pid_s * M + offs_m)[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptrs, partial, mask=m_mask[:, None] & n_mask[None, :])


def split_k_for(n: int, k_steps: int, block_n: int | None = None) -> int:
    """Slices of K: the largest divisor of its ``k_steps`` BLOCK_K steps that keeps the grid near TARGET_PROGRAMS."""
    wanted = max(1, TARGET_PROGRAMS // triton.cdiv(n, block_n or BLOCK_N))
    return max(d for d in range(1, min(k_steps, wanted) + 1) if k_steps % d == 0)


def qlora_small_m_base(x: torch.Tensor, weight: NF4Tensor) -> torch.Tensor:
    """``x @ W^T`` in fp32 for 2-D ``x`` with at most 16 rows, W decoded exactly as ``dequantize_nf4(W).to(x.dtype)``.

    The caller (``fused_qlora_linear``) has validated shapes; this checks what the kernel itself relies on.
    """
    M, K = x.shape
    N = weight.shape[0]
    if not 0 < M <= SMALL_M or weight.shape[1] != K or K % weight.blocksize or weight.blocksize % 32:
        raise ValueError(f"qlora_small_m_base: expected 1 to {SMALL_M} rows and W of K={K} columns in whole NF4 blocks, "
                         f"got x {tuple(x.shape)}, W {tuple(weight.shape)} blocksize {weight.blocksize}")
    block_k = min(BLOCK_K, weight.blocksize)
    split_k = split_k_for(N, K // block_k)
    k_per_split = K // split_k
    partial = new_output((split_k, M, N), torch.float32, x.device)
    packed, _, absmax, absmax_code, absmax_scale, absmax_offset = weight_arguments(weight)
    grid = (triton.cdiv(N, BLOCK_N), split_k)
    qlora_small_m_kernel[grid](
        x, packed, nf4_pair_levels(packed.device), absmax, absmax_code, absmax_scale, partial,
        M, N, K, k_per_split, weight.blocksize, x.stride(0), x.stride(1), absmax_offset,
        DOUBLE_QUANT=weight.double_quant, X_KIND=dtype_kind(x.dtype), W_ROUND=weight_rounding(weight.dtype, x.dtype),
        INTERPRET=INTERPRETING, DOT_DTYPE=dot_dtype(x.dtype), DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=SMALL_M, BLOCK_N=BLOCK_N, BLOCK_K=block_k, num_warps=NUM_WARPS, num_stages=NUM_STAGES, **LAUNCH_OPTIONS,
    )
    return partial.sum(0)


def qlora_small_m_forward(
    x: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, x @ A^T)`` for at most 16 rows, as ``qlora_forward`` returns them; A, B, bias already in x's dtype."""
    xa = x @ lora_A.t()  # rounded to x's dtype, as the reference rounds it
    y = qlora_small_m_base(x, weight) + scaling * (xa.float() @ lora_B.t().float())
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype), xa


if __name__ == "__main__":
    # As in Triton's tutorials: check against the reference, then (on a GPU) the GB/s at which each way reads its W.
    #   python kernels/qlora_small_m.py
    from lora_lab.kernels.qlora_forward import qlora_forward

    from lora_lab.lora import qlora_linear
    from lora_lab.nf4 import dequantize_nf4, quantize_nf4

    device, dtype = ("cpu", torch.float32) if INTERPRETING else ("cuda", torch.bfloat16)
    torch.manual_seed(0)
    weight = quantize_nf4(torch.randn(300, 256) * 0.02, 64, double_quant=True).to(device)
    lora_A = torch.randn(16, 256, device=device, dtype=dtype) / 16
    lora_B = torch.randn(300, 16, device=device, dtype=dtype) / 4
    bias = torch.randn(300, device=device, dtype=dtype)
    for rows in (1, 5, SMALL_M):
        x = torch.randn(rows, 256, device=device, dtype=dtype)
        y, _ = qlora_small_m_forward(x, weight, lora_A, lora_B, 2.0, bias)
        difference = y - qlora_linear(x, weight, lora_A, lora_B, 2.0, bias)
        print(f"max |split-K - reference| = {difference.abs().max().item():.3g} ({dtype}, M = {rows})")

    @triton.testing.perf_report(
        triton.testing.Benchmark(
            x_names=["M"], x_vals=[1, 4, 16], line_arg="provider", line_vals=["split_k", "fused", "cublas"],
            line_names=["NF4 split-K (Triton)", "NF4 output tiles only (qlora_forward)", "dense bf16 (cuBLAS)"],
            ylabel="GB/s of W read", plot_name="qlora-small-m-14336x4096-r16", args={},
        )
    )
    def benchmark(M: int, provider: str) -> float:
        """Decoding is bound by reading W: each way's bytes of W (NF4: about half a byte a weight; dense: two) per second."""
        N, K, r = 14336, 4096, 16  # Llama-3.1-8B's up_proj
        weight = quantize_nf4(torch.randn(N, K, device="cuda") * 0.02, 64, double_quant=True)
        dense = dequantize_nf4(weight).to(torch.bfloat16)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        lora_A = torch.randn(r, K, device="cuda", dtype=torch.bfloat16) / 64
        lora_B = torch.randn(N, r, device="cuda", dtype=torch.bfloat16)
        runs = {
            "split_k": lambda: qlora_small_m_forward(x, weight, lora_A, lora_B, 2.0, None),
            "fused": lambda: qlora_forward(x, weight, lora_A, lora_B, 2.0, None),
            "cublas": lambda: torch.addmm(x @ dense.t(), x @ lora_A.t(), lora_B.t(), alpha=2.0),
        }
        read = N * K * 2 if provider == "cublas" else weight.nbytes
        return read / triton.testing.do_bench(runs[provider]) * 1e-6

    if INTERPRETING:
        print("GB/s need a GPU: under Triton's interpreter the kernel runs on the CPU")
    else:
        benchmark.run(print_data=True)
