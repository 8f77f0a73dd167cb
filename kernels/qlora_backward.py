"""The fused QLoRA input gradient: ``dX = dY @ W + scaling * (dY @ B) @ A`` in one kernel.

The algorithm
-------------
In the backward pass ``dY`` is (M, N) and the gradient of ``x`` is (M, K):

    dX = dY @ W  +  scaling * (dY @ B) @ A

It has the shape of the forward pass with the roles of N and K swapped. The
r-wide ``dyb = dY @ B`` is computed once per call by one torch matmul and
rounded to dY's dtype (``dA = scaling * dyb^T @ X`` needs it too); each program
owns one (BLOCK_M, BLOCK_K) tile of dX and walks N, the reduction dimension,
in steps of BLOCK_N:

    for each N step:
        dy_tile  = dY[m-tile, n-step]                      (BLOCK_M, BLOCK_N)
        W_tile   = decode(W[n-step, k-tile])               (BLOCK_N, BLOCK_K), in registers
        acc     += dy_tile @ W_tile                        the base path

and the epilogue adds ``scaling * dyb[m-tile] @ A[:, k-tile]``. W is decoded
again from its 4-bit codes, exactly as in the forward pass, so nothing of W is
saved between the passes: QLoRA's activation memory is x, ``x @ A^T`` and
``dY @ B``, never an N x K matrix. A W tile is used untransposed here, and it
never spans two NF4 blocks along K for the same reason as in the forward
kernel (BLOCK_K divides the blocksize, which divides K). ``dY @ B`` stays out
of the kernel for the forward's reason: inside, every K-tile column of
programs would recompute it.
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
from lora_lab.kernels.qlora_forward import check_half_precision
from lora_lab.kernels.tiles import autotune_key_rows, autotune_over_nf4_tiles

from lora_lab.nf4 import NF4Tensor


@autotune_over_nf4_tiles(output=("K", "BLOCK_K"))
@triton.jit
def qlora_grad_input_kernel(
    # Pointers
    dy_ptr,  # [M, N] gradient of y (fp16 or bf16)
    packed_ptr, levels_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr,  # the NF4 weight [N, K], see common
    dyb_ptr,  # [M, r] dY @ B in dY's dtype, computed once before the kernel
    a_ptr,  # [r, K] lora_A in dY's dtype
    dx_ptr,  # [M, K] output, contiguous
    # Sizes
    M, N, K, R,
    M_BUCKET,  # M rounded up to a power of two: only the autotune key
    NF4_BLOCKSIZE: tl.constexpr,  # divides K; BLOCK_K divides it; a power of two, so dividing by it is a shift
    # Strides (elements)
    stride_dym, stride_dyn, stride_dybm, stride_dybr, stride_ar, stride_ak,
    # Scalars
    absmax_offset, scaling,
    # Meta-parameters
    DOUBLE_QUANT: tl.constexpr, R_PAD: tl.constexpr, X_KIND: tl.constexpr, W_ROUND: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering over (M tiles, K tiles), as in the forward kernel.
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_k = (K + BLOCK_K - 1) // BLOCK_K
    pids_per_group = GROUP_M * num_pid_k
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_k = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    m_mask, r_mask = offs_m < M, offs_r < R
    k_start = pid_k * BLOCK_K  # K is a multiple of BLOCK_K: every K tile is full

    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n
        n_mask = rows < N
        dy_ptrs = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym + rows[None, :] * stride_dyn
        dy = tl.load(dy_ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(DOT_DTYPE)
        w = weight_tile(  # rows past N meet zero columns of dY
            packed_ptr, levels_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, rows.to(tl.int64),
            n_mask, k_start, K, NF4_BLOCKSIZE, BLOCK_K, DOUBLE_QUANT, False, W_ROUND, X_KIND, INTERPRET, DOT_DTYPE,
        )
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)

    # Epilogue: the adapter's share, scaling * (dY @ B) @ A, then one rounding to the gradient's dtype.
    dyb_ptrs = dyb_ptr + offs_m.to(tl.int64)[:, None] * stride_dybm + offs_r[None, :] * stride_dybr
    dyb = tl.load(dyb_ptrs, mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(DOT_DTYPE)
    a_ptrs = a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak
    a = tl.load(a_ptrs, mask=r_mask[:, None], other=0.0).to(DOT_DTYPE)
    acc += scaling * tl.dot(dyb, a, input_precision=DOT_PRECISION)
    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(dx_ptrs, round_to(acc, X_KIND, INTERPRET), mask=m_mask[:, None])


def qlora_grad_input(
    grad_y: torch.Tensor,
    weight: NF4Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dyb: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the dX kernel on 2-D ``grad_y`` (M, N) in fp16 or bf16: returns ``(dX, dY @ B)``, both in dY's dtype.

    A and B must already be in dY's dtype (``fused_qlora_linear`` saved them cast). ``dyb``, if given, is
    ``dY @ B`` already computed (M x r in dY's dtype); otherwise it is computed here, once, by a torch matmul.
    """
    check_half_precision("qlora_grad_input", grad_y.dtype)
    M, N = grad_y.shape
    r, K = lora_A.shape
    if weight.shape != (N, K) or lora_B.shape != (N, r) or K % weight.blocksize:
        raise ValueError(f"qlora_grad_input: inconsistent shapes dY {tuple(grad_y.shape)}, W {tuple(weight.shape)}, r {r}")
    if dyb is None:
        dyb = grad_y @ lora_B  # rounded to dY's dtype, as the reference's autograd rounds it
    if dyb.shape != (M, r) or dyb.dtype != grad_y.dtype:
        raise ValueError(f"qlora_grad_input: expected dY @ B of shape {(M, r)} in {grad_y.dtype}, got "
                         f"{tuple(dyb.shape)} in {dyb.dtype}")
    grad_x = new_output((M, K), grad_y.dtype, grad_y.device)
    if M == 0:
        return grad_x, dyb
    packed, _, absmax, absmax_code, absmax_scale, absmax_offset = weight_arguments(weight)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
    qlora_grad_input_kernel[grid](
        grad_y, packed, nf4_pair_levels(packed.device), absmax, absmax_code, absmax_scale, dyb, lora_A, grad_x,
        M, N, K, r, autotune_key_rows(M), weight.blocksize,
        grad_y.stride(0), grad_y.stride(1), dyb.stride(0), dyb.stride(1), lora_A.stride(0), lora_A.stride(1),
        absmax_offset, float(scaling),
        DOUBLE_QUANT=weight.double_quant, R_PAD=r_padded(r), X_KIND=dtype_kind(grad_y.dtype),
        W_ROUND=weight_rounding(weight.dtype, grad_y.dtype), INTERPRET=INTERPRETING,
        DOT_DTYPE=dot_dtype(grad_y.dtype), DOT_PRECISION=dot_precision(grad_y.dtype), **LAUNCH_OPTIONS,
    )
    return grad_x, dyb


if __name__ == "__main__":
    # As in Triton's tutorials: check against the reference's autograd, then (on a GPU) TFLOP/s against cuBLAS.
    #   python kernels/qlora_backward.py
    from lora_lab.lora import qlora_linear
    from lora_lab.nf4 import dequantize_nf4, quantize_nf4

    device, dtype = "cpu" if INTERPRETING else "cuda", torch.bfloat16
    torch.manual_seed(0)
    weight = quantize_nf4(torch.randn(300, 256) * 0.02, 64, double_quant=True).to(device)
    x = torch.randn(100, 256, device=device, dtype=dtype, requires_grad=True)
    lora_A = torch.randn(16, 256, device=device, dtype=dtype) / 16
    lora_B = torch.randn(300, 16, device=device, dtype=dtype) / 4
    grad_y = torch.randn(100, 300, device=device, dtype=dtype)
    qlora_linear(x, weight, lora_A, lora_B, 2.0).backward(grad_y)
    grad_x, _ = qlora_grad_input(grad_y, weight, lora_A, lora_B, 2.0)
    print(f"max |kernel dX - reference dX| = {(grad_x - x.grad).abs().max().item():.3g} (bf16, NF4 decoded in registers)")

    @triton.testing.perf_report(
        triton.testing.Benchmark(
            x_names=["M"], x_vals=[32, 128, 256, 512, 1024, 2048], line_arg="provider", line_vals=["nf4", "cublas"],
            line_names=["NF4 tiles (Triton)", "dense bf16 (cuBLAS)"], ylabel="TFLOP/s",
            plot_name="qlora-grad-input-4096x4096-r16", args={},
        )
    )
    def benchmark(M: int, provider: str) -> float:
        K = N = 4096
        r = 16
        weight = quantize_nf4(torch.randn(N, K, device="cuda") * 0.02, 64, double_quant=True)
        dense = dequantize_nf4(weight).to(torch.bfloat16)  # decoded once, outside the timing
        grad_y = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        lora_A = torch.randn(r, K, device="cuda", dtype=torch.bfloat16) / 64
        lora_B = torch.randn(N, r, device="cuda", dtype=torch.bfloat16)
        if provider == "cublas":
            # the adapter term first, the GEMM on W accumulating into it (the dense path's order)
            run = lambda: torch.mm(grad_y @ lora_B, lora_A).addmm_(grad_y, dense, beta=2.0)  # noqa: E731
        else:
            run = lambda: qlora_grad_input(grad_y, weight, lora_A, lora_B, 2.0)  # noqa: E731
        return 2 * M * (N * K + r * (K + N)) / triton.testing.do_bench(run) * 1e-9

    if INTERPRETING:
        print("TFLOP/s need a GPU: under Triton's interpreter the kernel runs on the CPU")
    else:
        benchmark.run(print_data=True)
