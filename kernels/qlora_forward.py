"""The fused QLoRA forward: ``y = x @ W^T + bias + scaling * (x @ A^T) @ B^T`` in one kernel.

The algorithm
-------------
``x`` is (M, K), the frozen NF4 weight ``W`` is (N, K), the adapters are
``A`` (r, K) and ``B`` (N, r). The output is tiled as in Triton's matmul
tutorial: each program owns one (BLOCK_M, BLOCK_N) tile of ``y`` and walks K in
steps of BLOCK_K, accumulating in fp32:

    for each K step:
        x_tile  = x[m-tile, k-step]                        (BLOCK_M, BLOCK_K), from memory
        W_tile  = decode(W[n-tile, k-step])                (BLOCK_N, BLOCK_K), in registers
        acc    += x_tile @ W_tile^T                        the base path
        xa     += x_tile @ A[:, k-step]^T                  the LoRA down-projection, (BLOCK_M, r)

Two fusions save the memory traffic an unfused QLoRA layer pays:

1. *Dequantize in registers.* W's tile is decoded from 4-bit codes right
   before the tensor-core matmul (see ``common.load_nf4_tile``). W is read at
   half a byte per element and no dense copy of it exists, which is the
   point of QLoRA's memory saving (at large M, ``fused_qlora_linear`` may
   instead pass a dense W decoded once: the ``W_DENSE`` path). The decoded tile is rounded exactly as
   ``dequantize_nf4(W).to(x.dtype)`` rounds, so the base path multiplies the
   very numbers the reference multiplies.
2. *LoRA rides along.* ``x @ A^T`` needs the same ``x`` tile, already in
   registers, so it costs one small extra MMA per step (r is padded to 16, the
   smallest tensor-core operand). The epilogue finishes the adapter,
   ``acc += scaling * round(xa) @ B[n-tile]^T``, adds the bias, and stores ``y``
   once. The r-wide ``xa`` is rounded to x's dtype, as the reference does; the
   programs of the first tile column also store it, because the backward pass
   needs it for dB and the programs computed it anyway.

*Grouped ordering.* Programs are numbered so that GROUP_M consecutive programs
share a column of W tiles: while one group runs, its W tiles and x rows stay
in L2 instead of being refetched from HBM.

Every program recomputes ``x @ A^T`` for its rows (``cdiv(N, BLOCK_N)`` times
in all); that costs ``r / BLOCK_N`` of the base matmul, a few percent, and
avoids a second launch and an extra pass over x.
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


@autotune_over_nf4_tiles
@triton.jit
def qlora_forward_kernel(
    # Pointers
    x_ptr,  # [M, K] activations (x's dtype)
    packed_ptr, levels_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr,  # the NF4 weight [N, K], see common
    #   (with W_DENSE, packed_ptr is W already decoded, [N, K] in x's dtype: common.weight_tile)
    a_ptr,  # [r, K] lora_A in x's dtype
    b_ptr,  # [N, r] lora_B in x's dtype
    bias_ptr,  # [N] in x's dtype (read only when HAS_BIAS)
    y_ptr,  # [M, N] output, contiguous
    xa_ptr,  # [M, r] output x @ A^T in x's dtype, contiguous, saved for backward
    # Sizes
    M, N, K, R,
    M_BUCKET,  # M rounded up to a power of two: only the autotune key
    NF4_BLOCKSIZE: tl.constexpr,  # divides K; BLOCK_K divides it; a power of two, so dividing by it is a shift
    # Strides (elements)
    stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br,
    # Scalars
    absmax_offset,  # double quant: added to every decoded absmax
    scaling,  # LoRA alpha / r
    # Meta-parameters
    HAS_BIAS: tl.constexpr, DOUBLE_QUANT: tl.constexpr, W_DENSE: tl.constexpr,
    R_PAD: tl.constexpr,  # r padded to a power of two >= 16
    X_KIND: tl.constexpr,  # storage kind of x, y, A, B (common.FP32 / FP16 / BF16)
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
    at_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar  # A^T tile (BLOCK_K, R_PAD)
    w_rows = offs_n.to(tl.int64)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    xa = tl.full((BLOCK_M, R_PAD), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K: no mask along K
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0).to(DOT_DTYPE)
        at = tl.load(at_ptrs, mask=r_mask[None, :], other=0.0).to(DOT_DTYPE)
        w = weight_tile(
            packed_ptr, levels_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, w_rows, n_mask, k0,
            K, NF4_BLOCKSIZE, BLOCK_K, DOUBLE_QUANT, W_DENSE, W_ROUND, X_KIND, INTERPRET, DOT_DTYPE,
        )
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        xa = tl.dot(x, at, xa, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        at_ptrs += BLOCK_K * stride_ak

    # Epilogue: finish the adapter with B, add the bias, round once to x's dtype.
    xa = round_to(xa, X_KIND, INTERPRET)  # the reference's (x @ A^T) is in x's dtype too
    bt_ptrs = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn  # B^T tile (R_PAD, BLOCK_N)
    bt = tl.load(bt_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(DOT_DTYPE)
    acc += scaling * tl.dot(xa, bt, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(y_ptrs, round_to(acc, X_KIND, INTERPRET), mask=m_mask[:, None] & n_mask[None, :])
    if pid_n == 0:  # one program per row block saves x @ A^T for the backward pass
        tl.store(xa_ptr + offs_m[:, None] * R + offs_r[None, :], xa, mask=m_mask[:, None] & r_mask[None, :])


def qlora_forward(
    x: torch.Tensor,
    weight: NF4Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None,
    dense: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on 2-D ``x`` (M, K): returns ``(y, x @ A^T)``, both in x's dtype.

    ``dense``, if given, is W decoded once already, ``dequantize_nf4(W).to(x.dtype)``
    (the large-M path): the kernel reads it instead of decoding NF4 tiles.
    The caller (``fused_qlora_linear``) has validated shapes and cast A, B and the
    bias to x's dtype; this only checks what the kernel itself relies on.
    """
    M, K = x.shape
    N, r = lora_B.shape
    if weight.shape != (N, K) or lora_A.shape != (r, K) or K % weight.blocksize:
        raise ValueError(f"qlora_forward: inconsistent shapes x {tuple(x.shape)}, W {tuple(weight.shape)}, r {r}")
    if dense is not None and (dense.shape != (N, K) or dense.dtype != x.dtype or not dense.is_contiguous()):
        raise ValueError(f"qlora_forward: expected the dense W contiguous, {(N, K)} in {x.dtype}, got "
                         f"{tuple(dense.shape)} in {dense.dtype}")
    y = new_output((M, N), x.dtype, x.device)
    xa = new_output((M, r), x.dtype, x.device)
    if M == 0:
        return y, xa
    packed, _, absmax, absmax_code, absmax_scale, absmax_offset = weight_arguments(weight)
    levels = nf4_pair_levels(packed.device)
    packed = packed if dense is None else dense
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    qlora_forward_kernel[grid](
        x, packed, levels, absmax, absmax_code, absmax_scale, lora_A, lora_B, x if bias is None else bias, y, xa,
        M, N, K, r, autotune_key_rows(M), weight.blocksize,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        absmax_offset, float(scaling),
        HAS_BIAS=bias is not None, DOUBLE_QUANT=weight.double_quant, W_DENSE=dense is not None, R_PAD=r_padded(r),
        X_KIND=dtype_kind(x.dtype), W_ROUND=weight_rounding(weight.dtype, x.dtype),
        INTERPRET=INTERPRETING, DOT_DTYPE=dot_dtype(x.dtype), DOT_PRECISION=dot_precision(x.dtype), **LAUNCH_OPTIONS,
    )
    return y, xa


if __name__ == "__main__":
    # As in Triton's tutorials: check against the reference, then (on a GPU) TFLOP/s against cuBLAS on a dense weight.
    #   python kernels/qlora_forward.py
    from lora_lab.lora import qlora_linear
    from lora_lab.nf4 import dequantize_nf4, quantize_nf4

    device, dtype = ("cpu", torch.float32) if INTERPRETING else ("cuda", torch.bfloat16)
    torch.manual_seed(0)
    weight = quantize_nf4(torch.randn(300, 256) * 0.02, 64, double_quant=True).to(device)
    x = torch.randn(100, 256, device=device, dtype=dtype)
    lora_A = torch.randn(16, 256, device=device, dtype=dtype) / 16
    lora_B = torch.randn(300, 16, device=device, dtype=dtype) / 4
    bias = torch.randn(300, device=device, dtype=dtype)
    expected = qlora_linear(x, weight, lora_A, lora_B, 2.0, bias)
    for what, dense in (("NF4 decoded in registers", None), ("W_DENSE", dequantize_nf4(weight).to(dtype))):
        y, _ = qlora_forward(x, weight, lora_A, lora_B, 2.0, bias, dense)
        print(f"max |kernel - reference| = {(y - expected).abs().max().item():.3g} ({dtype}, {what})")

    @triton.testing.perf_report(
        triton.testing.Benchmark(
            x_names=["M"], x_vals=[128, 512, 1024, 4096, 8192], line_arg="provider", line_vals=["nf4", "dense", "cublas"],
            line_names=["NF4 tiles (Triton)", "W_DENSE (Triton)", "dense bf16 (cuBLAS)"], ylabel="TFLOP/s",
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
            run = lambda: torch.addmm(x @ dense.t(), x @ lora_A.t(), lora_B.t(), alpha=2.0)  # noqa: E731
        else:
            run = lambda: qlora_forward(x, weight, lora_A, lora_B, 2.0, None, dense if provider == "dense" else None)  # noqa: E731
        return 2 * M * (N * K + r * (K + N)) / triton.testing.do_bench(run) * 1e-9

    if INTERPRETING:
        print("TFLOP/s need a GPU: under Triton's interpreter the kernel runs on the CPU")
    else:
        benchmark.run(print_data=True)
