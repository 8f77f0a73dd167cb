"""The QLoRA forward for a few rows (M <= 16, decoding): two launches, the first streaming W from every SM.

The algorithm
-------------
At small M (one token per sequence while generating, M = batch) the layer is a
matrix-vector product: ``y = x @ W^T`` reads all of W (N x K, half a byte per
weight) to do 2·M·N·K FLOPs, so its time is W's bytes over HBM bandwidth, if
enough programs stream W at once. Tiling only the output gives ``cdiv(N,
BLOCK_N)`` programs (32 for N = 4096), too few for 132 SMs to saturate HBM. And
at this size a call is a few microseconds of kernel, so every extra launch
(a torch sum, a matmul, a cast: ~2-5 µs each) costs as much as the work.

So a call makes exactly two launches (``LAUNCHES``):

1. ``qlora_small_m_kernel``, split-K over W, as gemlite's and bitsandbytes'
   GEMV kernels do. Program ``(n, s)`` owns the (16, BLOCK_N) tile ``n`` of the
   output and the ``s``-th of ``SPLIT_K`` equal slices of K, and writes its
   fp32 partial sum to a workspace of shape (SPLIT_K, M, N):

       for each K step in slice s:
           W_tile    = decode(W[n-tile, k-step])      (BLOCK_N, BLOCK_K), in registers
           partial^T += W_tile @ x[:, k-step]^T      (BLOCK_N, 16), fp32

   The product is taken transposed (the operand swap): the decoded W tile is
   the MMA's first operand, whose rows may be many (BLOCK_N), and x, with its
   16 padded rows, the second. On sm_90a that lets Triton use wgmma (64 rows a
   warpgroup; 7.97 SASS instructions per weight instead of 8.08 when it was
   measured, with an older decode); in fp32 it halves the registers (128 -> 62
   for a 16 x 32 x 32 tile); on sm_80 it changes nothing (``compile_check
   --sass``). The loop advances its pointers to W's bytes by BLOCK_K / 2 a
   step instead of recomputing them from the row and k0 (a 64-bit halving per
   load), decodes them with ``common.decode_nf4_bytes``, and has Triton
   convert the decoded tile to the MMA operand's layout in x's dtype
   (``convert_here``); its loads of W need no mask, and its NF4 block
   indices are unsigned: 4.86 SASS instructions a weight on sm_90a, 5.02 on
   sm_80 (bf16, r = 16; see ``GPU_TILE`` for the tile and its single stage).

   The LoRA down-projection rides along, spread over the slices: program
   ``(s mod cdiv(N, BLOCK_N), s)`` also sums its slice of ``x @ A^T`` into a
   (SPLIT_K, M, r) fp32 workspace, so SPLIT_K different programs, one per
   slice, each read A's slice once: no single program reads all of A.

2. ``qlora_small_m_reduce_kernel``, one program per (16, REDUCE_BLOCK_N) output
   tile: it sums the SPLIT_K partials of its tile and of ``x @ A^T`` in a fixed
   order (slice 0 first: deterministic, unlike atomics), rounds ``x @ A^T`` to
   x's dtype as the reference does, adds ``scaling * round(x @ A^T) @ B^T``
   and the bias, and stores ``y`` rounded once to x's dtype; program 0 also
   stores ``round(x @ A^T)``, which the backward pass needs for dB.

How many slices, and the tiles: ``small_m_grid.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lora_lab.kernels.common import (
    FP32,
    INTERPRETING,
    LAUNCH_OPTIONS,
    decode_nf4_bytes,
    dot_dtype,
    dot_precision,
    dtype_kind,
    load_absmax,
    new_output,
    nf4_pair_levels,
    r_padded,
    round_to,
    weight_arguments,
    weight_operand,
    weight_rounding,
)
from lora_lab.kernels.small_m_grid import (  # noqa: F401 - the sizing is part of this kernel's interface
    GPU_TILE,
    small_m_grid,
    split_k_for,
    step_k,
    tile_for,
    workspace_share,
)

from lora_lab.nf4 import NF4Tensor

SMALL_M = 16  # the most rows this kernel takes: one 16-row MMA tile
# The kernels one call of qlora_small_m_forward launches, in order, and nothing else (no torch op on the device).
LAUNCHES = ("qlora_small_m_kernel", "qlora_small_m_reduce_kernel")
# Columns of K per step of launch 1's x @ A^T: on a GPU a (16, 16, R_PAD) fp32 product, 32 values a thread.
XA_K = 32 if INTERPRETING else 16
# The reduction's output tile, (16, 32): N / 32 programs (32 for k_proj), each reading SPLIT_K x M x 32 partials and
# re-summing all SPLIT_K x M x r of x @ A^T (a second launch of its own would cost more than that L2 read).
REDUCE_BLOCK_N = 32


@triton.jit
def convert_here(w, X_KIND: tl.constexpr, INTERPRET: tl.constexpr):
    """``w`` unchanged, but on a GPU its 16-bit values are what Triton moves into the MMA operand's layout.

    The decode leaves each thread a run of consecutive weights of a row (the
    layout of the loaded bytes), where the tensor-core operand wants each
    thread to hold pairs spread over rows and K: a layout conversion through
    shared memory. Left alone, Triton rematerializes the decode's elementwise
    work (bitcasts, product with absmax, rounding) in the operand's layout and
    converts where it must stop, at the level-table gather: its int64 level
    pairs, 4 bytes a weight. An identity ``mov`` it may not duplicate or
    move (inline assembly marked impure) pins the conversion here, after the
    rounding to x's dtype: 2 bytes a weight, stored, then read back with
    ``ldmatrix``. Measured with ``compile_check --sass`` (bf16, r = 16, the
    16 x 128 x 64 tile with one stage): 5.72 -> 5.08 SASS instructions a weight
    on sm_90a, 5.89 -> 5.19 on sm_80, 8.6 -> 4.6 bytes of shared-memory traffic
    a weight, bit-exact (a copy). The interpreter has no inline assembly and
    fp32 (no tensor cores) no such conversion: both take ``w`` as it is.
    """
    if not INTERPRET and X_KIND != FP32:
        w = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [w], dtype=w.dtype, is_pure=False, pack=2)
    return w


@triton.jit
def qlora_small_m_kernel(
    # Pointers
    x_ptr,  # [M, K] activations (x's dtype), M <= BLOCK_M
    packed_ptr, levels_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr,  # the NF4 weight [N, K], see common
    a_ptr,  # [r, K] lora_A in x's dtype
    partial_ptr,  # [SPLIT_K, M, N] fp32 output: one partial x @ W^T per K slice, contiguous
    xa_partial_ptr,  # [SPLIT_K, M, r] fp32 output: one partial x @ A^T per K slice, contiguous
    # Sizes
    M, N, K, R,
    K_PER_SPLIT,  # elements of K each program reduces: a multiple of BLOCK_K that divides K
    NF4_BLOCKSIZE: tl.constexpr,  # divides K; BLOCK_K divides it; a power of two, so dividing by it is a shift
    stride_xm, stride_xk, stride_ar, stride_ak,
    absmax_offset,  # double quant: added to every decoded absmax
    # Meta-parameters
    DOUBLE_QUANT: tl.constexpr, X_KIND: tl.constexpr, W_ROUND: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,  # r padded to a power of two >= 16
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STEP_BLOCKS: tl.constexpr,  # NF4 blocks a K step spans: BLOCK_K // NF4_BLOCKSIZE, at least 1
    XA_K: tl.constexpr,  # columns of x @ A^T summed per step (divides BLOCK_K)
):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    k_begin = pid_s * K_PER_SPLIT
    # Rows past N (the last tile's) read row N - 1 instead, and their sums are never stored: W's loads need no mask
    # (no predicate, no zeroing of registers each step; compile_check --sass, bf16: 4.98 -> 4.86 a weight on sm_90a).
    w_rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    blocks_per_row = K // NF4_BLOCKSIZE

    xt_ptrs = x_ptr + offs_m[None, :] * stride_xm + (k_begin + offs_k)[:, None] * stride_xk  # x^T (BLOCK_K, BLOCK_M)
    # W's bytes of a step as (BLOCK_N, STEP_BLOCKS, bytes of an NF4 block in the step): one absmax per (row, block).
    STEP_BYTES: tl.constexpr = BLOCK_K // 2 // STEP_BLOCKS
    byte_ptrs = (packed_ptr + (w_rows * (K // 2) + pid_s * (K_PER_SPLIT // 2))[:, None, None]
                 + (tl.arange(0, STEP_BLOCKS) * STEP_BYTES)[None, :, None] + tl.arange(0, STEP_BYTES)[None, None, :])
    # NF4 block indices unsigned (and k0 made so below), so that dividing by a power of two (the blocksize here, the
    # 256 blocks of an absmax scale in load_absmax) is a shift, without a signed division's rounding fix-up.
    row_blocks = ((w_rows * blocks_per_row)[:, None] + tl.arange(0, STEP_BLOCKS)[None, :]).to(tl.uint64)
    all_rows = tl.full((BLOCK_N, STEP_BLOCKS), 1, tl.int1)
    partial = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)  # transposed: W is the MMA's first operand
    for k0 in range(k_begin, k_begin + K_PER_SPLIT, BLOCK_K):  # SPLIT_K divides K's steps: every slice is full
        xt = tl.load(xt_ptrs, mask=m_mask[None, :], other=0.0).to(DOT_DTYPE)
        packed = tl.load(byte_ptrs)
        absmax = load_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset,
                             row_blocks + tl.cast(k0, tl.uint32) // NF4_BLOCKSIZE, all_rows, DOUBLE_QUANT)
        w = decode_nf4_bytes(packed, levels_ptr, absmax[:, :, None])
        w = convert_here(weight_operand(w, W_ROUND, X_KIND, INTERPRET), X_KIND, INTERPRET)
        partial = tl.dot(w, xt, partial, input_precision=DOT_PRECISION)
        xt_ptrs += BLOCK_K * stride_xk
        byte_ptrs += BLOCK_K // 2
    out_ptrs = partial_ptr + (pid_s * M + offs_m)[None, :].to(tl.int64) * N + offs_n[:, None]
    tl.store(out_ptrs, partial, mask=m_mask[None, :] & n_mask[:, None])

    # The LoRA down-projection of this slice, by one program per slice: a different tile column for each slice,
    # so the extra reads of A (r·K_PER_SPLIT elements) land on SPLIT_K programs spread over the grid. In fp32 FMAs,
    # XA_K columns at a time, not tl.dot: a second MMA loop beside the K loop would be the one compile_check's
    # SASS count takes for "the K loop" (the shortest loop with an MMA), and one MMA loop with a branch in it needed
    # 156 registers on sm_90a instead of 124 (3 programs an SM instead of 4). In fp32 the sum is an IEEE tl.dot
    # (FMAs too, no MMA): Triton 3.6 turned the broadcast-and-sum into a TF32 mma.sync, too coarse for fp32.
    if pid_n == pid_s % tl.num_programs(0):
        offs_r, offs_kk = tl.arange(0, R_PAD), tl.arange(0, XA_K)
        r_mask = offs_r < R
        x_slice_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_begin + offs_kk)[None, :] * stride_xk
        at_ptrs = a_ptr + (k_begin + offs_kk)[:, None] * stride_ak + offs_r[None, :] * stride_ar  # (XA_K, R_PAD)
        xa = tl.full((BLOCK_M, R_PAD), 0.0, tl.float32)
        for _ in range(0, K_PER_SPLIT, XA_K):
            x_cols = tl.load(x_slice_ptrs, mask=m_mask[:, None], other=0.0).to(tl.float32)
            at = tl.load(at_ptrs, mask=r_mask[None, :], other=0.0).to(tl.float32)
            if X_KIND == FP32:  # Triton 3.6 compiles the sum below to a TF32 mma in fp32; an IEEE dot is exact FMAs
                xa = tl.dot(x_cols, at, xa, input_precision="ieee")
            else:
                xa += tl.sum(x_cols[:, :, None] * at[None, :, :], axis=1)
            x_slice_ptrs += XA_K * stride_xk
            at_ptrs += XA_K * stride_ak
        xa_ptrs = xa_partial_ptr + (pid_s * M + offs_m)[:, None] * R + offs_r[None, :]
        tl.store(xa_ptrs, xa, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def qlora_small_m_reduce_kernel(
    # Pointers
    partial_ptr,  # [SPLIT_K, M, N] fp32 partials of x @ W^T (launch 1)
    xa_partial_ptr,  # [SPLIT_K, M, r] fp32 partials of x @ A^T (launch 1)
    b_ptr,  # [N, r] lora_B in x's dtype
    bias_ptr,  # [N] in x's dtype (read only when HAS_BIAS)
    y_ptr,  # [M, N] output in x's dtype, contiguous
    xa_ptr,  # [M, r] output round(x @ A^T) in x's dtype, contiguous, saved for backward
    # Sizes
    M, N, R, SPLIT_K,
    stride_bn, stride_br,
    scaling,  # LoRA alpha / r
    # Meta-parameters
    HAS_BIAS: tl.constexpr, X_KIND: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * TILE_N + tl.arange(0, TILE_N)
    offs_r = tl.arange(0, R_PAD)
    m_mask, n_mask, r_mask = offs_m < M, offs_n < N, offs_r < R
    mn_mask, mr_mask = m_mask[:, None] & n_mask[None, :], m_mask[:, None] & r_mask[None, :]

    # Slice 0 first, then 1, ...: the same sums in the same order on every call (no atomics).
    acc = tl.full((BLOCK_M, TILE_N), 0.0, tl.float32)
    xa = tl.full((BLOCK_M, R_PAD), 0.0, tl.float32)
    partial_ptrs = partial_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    xa_partial_ptrs = xa_partial_ptr + offs_m[:, None] * R + offs_r[None, :]
    for _ in range(0, SPLIT_K):
        acc += tl.load(partial_ptrs, mask=mn_mask, other=0.0)
        xa += tl.load(xa_partial_ptrs, mask=mr_mask, other=0.0)
        partial_ptrs += M * N
        xa_partial_ptrs += M * R

    xa = round_to(xa, X_KIND, INTERPRET)  # the reference's (x @ A^T) is in x's dtype
    bt_ptrs = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn  # B^T tile (R_PAD, TILE_N)
    bt = tl.load(bt_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(DOT_DTYPE)
    acc += scaling * tl.dot(xa.to(DOT_DTYPE), bt, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], round_to(acc, X_KIND, INTERPRET), mask=mn_mask)
    if pid == 0:
        tl.store(xa_ptr + offs_m[:, None] * R + offs_r[None, :], xa, mask=mr_mask)


def check_small_m_operands(x: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor) -> None:
    """What the kernels rely on (the caller, ``fused_qlora_linear``, has validated the rest of the contract)."""
    M, K = x.shape
    if not 0 < M <= SMALL_M or weight.shape[1] != K or lora_A.shape[1] != K or K % weight.blocksize or weight.blocksize % 32:
        raise ValueError(f"qlora_small_m: expected 1 to {SMALL_M} rows, W (N, K) in whole NF4 blocks of at least 32 and "
                         f"A (r, K); got x {tuple(x.shape)}, W {tuple(weight.shape)} blocksize {weight.blocksize}, "
                         f"A {tuple(lora_A.shape)}")


def kernel_kinds(x: torch.Tensor, r: int) -> dict:
    """The constexprs both launches take from x's dtype and the rank."""
    return dict(X_KIND=dtype_kind(x.dtype), INTERPRET=INTERPRETING, DOT_DTYPE=dot_dtype(x.dtype),
                DOT_PRECISION=dot_precision(x.dtype), R_PAD=r_padded(r), BLOCK_M=SMALL_M)


def qlora_small_m_partials(x: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch 1: the fp32 partials ``(x @ W^T, x @ A^T)`` of each K slice, shapes (SPLIT_K, M, N) and (SPLIT_K, M, r)."""
    check_small_m_operands(x, weight, lora_A)
    (M, K), N, r = x.shape, weight.shape[0], lora_A.shape[0]
    block_n, _, num_warps, num_stages = tile_for(x.dtype)
    block_k = step_k(K, weight.blocksize, x.dtype)
    grid = small_m_grid(M, N, K, weight.blocksize, x.dtype)
    partial = new_output((grid[1], M, N), torch.float32, x.device)
    xa_partial = new_output((grid[1], M, r), torch.float32, x.device)
    packed, _, absmax, absmax_code, absmax_scale, absmax_offset = weight_arguments(weight)
    qlora_small_m_kernel[grid](
        x, packed, nf4_pair_levels(packed.device), absmax, absmax_code, absmax_scale, lora_A, partial, xa_partial,
        M, N, K, r, K // grid[1], weight.blocksize, x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
        absmax_offset, DOUBLE_QUANT=weight.double_quant, W_ROUND=weight_rounding(weight.dtype, x.dtype),
        BLOCK_N=block_n, BLOCK_K=block_k, STEP_BLOCKS=max(1, block_k // weight.blocksize), XA_K=XA_K,
        num_warps=num_warps, num_stages=num_stages,
        **kernel_kinds(x, r), **LAUNCH_OPTIONS,
    )
    return partial, xa_partial


def qlora_small_m_forward(
    x: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, round(x @ A^T))`` for at most 16 rows, as ``qlora_forward`` returns them; A, B, bias in x's dtype.

    ``LAUNCHES`` kernel launches and no other device work: the partials, then their reduction with the epilogue.
    """
    M, N, r = x.shape[0], weight.shape[0], lora_A.shape[0]
    if lora_B.shape != (N, r):
        raise ValueError(f"qlora_small_m_forward: expected B of shape {(N, r)}, got {tuple(lora_B.shape)}")
    partial, xa_partial = qlora_small_m_partials(x, weight, lora_A)
    y, xa = new_output((M, N), x.dtype, x.device), new_output((M, r), x.dtype, x.device)
    qlora_small_m_reduce_kernel[(triton.cdiv(N, REDUCE_BLOCK_N),)](
        partial, xa_partial, lora_B, x if bias is None else bias, y, xa,
        M, N, r, partial.shape[0], lora_B.stride(0), lora_B.stride(1), float(scaling),
        HAS_BIAS=bias is not None, TILE_N=REDUCE_BLOCK_N, num_warps=4, **kernel_kinds(x, r), **LAUNCH_OPTIONS,
    )
    return y, xa


if __name__ == "__main__":
    # As in Triton's tutorials: check against the reference, then (on a GPU) the GB/s at which each way reads its W.
    #   python -m lora_lab.kernels.qlora_small_m
    # (as a module: run as a file, triton is imported before lora_lab.kernels.common can ask for its interpreter,
    # and Triton's own tl.sum is then defined compiled, which the interpreted kernel cannot call)
    from lora_lab.kernels.qlora_forward import qlora_forward

    from lora_lab.lora import qlora_linear
    from lora_lab.nf4 import dequantize_nf4, quantize_nf4

    # This kernel itself takes fp32 too (its FP32_GPU_TILE; fused_qlora_linear sends fp32 to the dense path), so the
    # check runs both where it is cheap; qlora_forward, in the benchmark below, takes only fp16/bf16.
    device = "cpu" if INTERPRETING else "cuda"
    torch.manual_seed(0)
    weight = quantize_nf4(torch.randn(300, 256) * 0.02, 64, double_quant=True).to(device)
    for dtype in (torch.float32, torch.bfloat16):
        lora_A = torch.randn(16, 256, device=device, dtype=dtype) / 16
        lora_B = torch.randn(300, 16, device=device, dtype=dtype) / 4
        bias = torch.randn(300, device=device, dtype=dtype)
        for rows in (1, 5, SMALL_M):
            x = torch.randn(rows, 256, device=device, dtype=dtype)
            y, _ = qlora_small_m_forward(x, weight, lora_A, lora_B, 2.0, bias)
            difference = (y - qlora_linear(x, weight, lora_A, lora_B, 2.0, bias)).float()
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
