"""``fused_qlora_linear``: the QLoRA linear op with a fused forward kernel and a fused backward.

The op is ``y = x @ W^T + bias + scaling * (x @ A^T) @ B^T`` with the frozen
weight W in NF4: the contract of ``lora_lab.lora.qlora_linear``. Its gradients,
with ``X`` the input flattened to (M, K) and ``dY`` the output gradient (M, N):

    dX    = dY @ W + scaling * (dY @ B) @ A        the second fused kernel (qlora_backward.py)
    dA    = scaling * (dY @ B)^T @ X               (r, K)
    dB    = scaling * dY^T @ (X @ A^T)             (N, r)
    dbias = sum of dY over the rows                (N,)
    dW    = none: W is frozen

Only dX touches W, so only dX needs a kernel that decodes NF4. dA and dB are
ordinary dense matmuls with one r-wide operand; they run as torch matmuls
(cuBLAS on a GPU), which are as fast as anything we could write for them. Their
r-wide operands come for free: the forward kernel stores ``X @ A^T`` and the
dX kernel stores ``dY @ B``. What autograd keeps between the passes is X,
``X @ A^T`` (M x r), and A and B in x's dtype: never W dequantized.

A, B and the bias are cast to x's dtype first, as the reference does, and
their gradients are cast back to their own dtypes.

Which kernel, by M
------------------
The right kernel depends on the rows M (batch x sequence), as in bitsandbytes:

- ``M <= 16`` (decoding): ``qlora_small_m.py``, split-K over W, so that a
  layer that is all weight-reading keeps every SM streaming W.
- ``16 < M < DENSE_FROM_M``: the fused kernels, W decoded tile by tile in registers.
- ``M >= DENSE_FROM_M`` (training, prefill): the fused kernels decode each W
  tile once per row tile, ``cdiv(M, BLOCK_M)`` times in all, which costs more
  than decoding W once (``nf4_dequantize``) and reading it dense; so W is
  dequantized once per pass and the same matmul kernels read it (``W_DENSE``),
  with the LoRA path still fused in their epilogue. The dense copy lives only
  for the duration of one kernel, forward or backward.

``LORA_LAB_KERNEL_PATH=fused`` or ``=dense`` forces one path for every M
(tests and the benchmark compare them); the threshold is the static model's
(``lora-lab bench --plan``) until a GPU measures it.
"""

from __future__ import annotations

import os

import torch
from lora_lab.kernels.common import check_block_multiple, check_device, check_interpreter_numpy, dtype_kind
from lora_lab.kernels.nf4_dequantize import nf4_dequantize
from lora_lab.kernels.qlora_backward import qlora_grad_input
from lora_lab.kernels.qlora_forward import qlora_forward
from lora_lab.kernels.qlora_small_m import SMALL_M, qlora_small_m_forward

from lora_lab.nf4 import FLOAT_DTYPES, NF4Tensor
from lora_lab.operands import check_qlora_operands

DENSE_FROM_M = 1024  # from here on W is dequantized once per pass (see the module docstring)
PATHS = ("auto", "fused", "dense")
FORCED_PATH = os.environ.get("LORA_LAB_KERNEL_PATH", "auto")
if FORCED_PATH not in PATHS:
    raise ValueError(f"LORA_LAB_KERNEL_PATH must be one of {', '.join(PATHS)}, got {FORCED_PATH!r}")


def kernel_path(m: int) -> str:
    """``"small_m"``, ``"fused"`` or ``"dense"``: the kernels a layer of ``m`` rows runs (forward; dX never small_m)."""
    if FORCED_PATH != "auto":
        return FORCED_PATH
    if m <= SMALL_M:
        return "small_m"
    return "dense" if m >= DENSE_FROM_M else "fused"


def dense_weight(weight: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_nf4(W).to(dtype)``: one kernel, then a cast only if W's dtype is not x's."""
    dense = nf4_dequantize(weight)
    return dense if dense.dtype == dtype else dense.to(dtype)


class FusedQLoRALinear(torch.autograd.Function):
    """Forward and dX run as fused Triton kernels; dA, dB and dbias from the saved r-wide products."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, scaling, bias):
        K, N = x.shape[-1], weight.shape[0]
        x2d = x.reshape(-1, K)
        a = lora_A.to(x.dtype).contiguous()
        b = lora_B.to(x.dtype).contiguous()
        bias_x = None if bias is None else bias.to(x.dtype).contiguous()
        path = kernel_path(x2d.shape[0])
        if path == "small_m" and x2d.shape[0] > 0:
            y, xa = qlora_small_m_forward(x2d, weight, a, b, scaling, bias_x)
        else:
            dense = dense_weight(weight, x.dtype) if path == "dense" else None
            y, xa = qlora_forward(x2d, weight, a, b, scaling, bias_x, dense)
        ctx.save_for_backward(x2d, xa, a, b)
        ctx.weight, ctx.scaling, ctx.x_shape = weight, scaling, x.shape
        ctx.param_dtypes = (lora_A.dtype, lora_B.dtype, None if bias is None else bias.dtype)
        return y.reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, grad_y):
        x2d, xa, a, b = ctx.saved_tensors
        need_x, _, need_A, need_B, _, need_bias = ctx.needs_input_grad
        dy = grad_y.reshape(-1, grad_y.shape[-1]).to(x2d.dtype)
        a_dtype, b_dtype, bias_dtype = ctx.param_dtypes
        grad_x = grad_A = grad_B = grad_bias = None
        dyb = None
        if need_x:
            dense = dense_weight(ctx.weight, dy.dtype) if kernel_path(dy.shape[0]) == "dense" else None
            grad_x2d, dyb = qlora_grad_input(dy, ctx.weight, a, b, ctx.scaling, dense)
            grad_x = grad_x2d.reshape(ctx.x_shape)
        if need_A:
            dyb = dy @ b if dyb is None else dyb
            grad_A = (dyb.t() @ x2d).mul_(ctx.scaling).to(a_dtype)
        if need_B:
            grad_B = (dy.t() @ xa).mul_(ctx.scaling).to(b_dtype)
        if need_bias:
            grad_bias = dy.sum(0, dtype=torch.float32).to(bias_dtype)
        return grad_x, None, grad_A, grad_B, None, grad_bias


def _check_operands(x, weight, lora_A, lora_B, scaling, bias) -> None:
    """The reference's shape rules, plus what the kernels need: a supported dtype, one device, K % blocksize == 0."""
    check_qlora_operands(x, weight, lora_A, lora_B, bias, scaling)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"the kernels take x in float32, float16 or bfloat16, got {x.dtype}; use lora_lab.lora.qlora_linear for others"
        )
    dtype_kind(weight.dtype)
    k_in = weight.shape[1]
    check_block_multiple(k_in, weight.blocksize)
    check_device(x, weight.packed, lora_A, lora_B, *([] if bias is None else [bias]))
    check_interpreter_numpy()


def fused_qlora_linear(
    x: torch.Tensor,
    weight: NF4Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ W^T + bias + scaling * (x @ A^T) @ B^T``, equal to ``lora_lab.lora.qlora_linear``.

    x is (..., K) in float32, float16 or bfloat16; W (N, K) in NF4 with K a
    multiple of its blocksize; A (r, K); B (N, r); bias (N,). y is (..., N) in
    x's dtype. Differentiable in x, A, B and bias, never in W. Below
    ``DENSE_FROM_M`` rows W is decoded tile by tile inside the kernels, in the
    forward and again in the backward, so no dense copy of it is made; from
    there on each pass dequantizes W into a temporary (N x K in x's dtype, freed
    after the kernel), as bitsandbytes does; ``LORA_LAB_KERNEL_PATH=fused``
    keeps the no-copy path at every M.
    """
    _check_operands(x, weight, lora_A, lora_B, scaling, bias)
    return FusedQLoRALinear.apply(x, weight, lora_A, lora_B, float(scaling), bias)


if __name__ == "__main__":
    # As in Triton's tutorials: check against the reference, then (on a GPU) TFLOP/s against cuBLAS on a dense weight.
    #   python kernels/fused_qlora_linear.py
    import triton
    from lora_lab.kernels.common import INTERPRETING

    from lora_lab.lora import qlora_linear
    from lora_lab.nf4 import dequantize_nf4, quantize_nf4

    device, dtype = ("cpu", torch.float32) if INTERPRETING else ("cuda", torch.bfloat16)
    torch.manual_seed(0)
    weight = quantize_nf4(torch.randn(300, 256) * 0.02, 64, double_quant=True).to(device)
    x = torch.randn(100, 256, device=device, dtype=dtype)
    lora_A, lora_B = torch.randn(16, 256, device=device) / 16, torch.randn(300, 16, device=device) / 4
    difference = fused_qlora_linear(x, weight, lora_A, lora_B, 2.0) - qlora_linear(x, weight, lora_A, lora_B, 2.0)
    print(f"max |fused - reference| = {difference.abs().max().item():.3g} ({dtype})")

    @triton.testing.perf_report(
        triton.testing.Benchmark(
            x_names=["M"], x_vals=[16, 256, 1024, 4096], line_arg="provider", line_vals=["fused", "cublas"],
            line_names=["NF4 fused (Triton)", "dense bf16 (cuBLAS)"], ylabel="TFLOP/s",
            plot_name="qlora-forward-4096x4096-r16", args={},
        )
    )
    def benchmark(M: int, provider: str) -> float:
        K = N = 4096
        r = 16
        weight = quantize_nf4(torch.randn(N, K, device="cuda") * 0.02, 64, double_quant=True)
        dense = dequantize_nf4(weight).to(torch.bfloat16)  # what cuBLAS gets: 4x the memory of NF4
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        lora_A = torch.randn(r, K, device="cuda", dtype=torch.bfloat16) / 64
        lora_B = torch.randn(N, r, device="cuda", dtype=torch.bfloat16)
        if provider == "fused":
            run = lambda: fused_qlora_linear(x, weight, lora_A, lora_B, 2.0)  # noqa: E731
        else:
            run = lambda: torch.addmm(x @ dense.t(), x @ lora_A.t(), lora_B.t(), alpha=2.0)  # noqa: E731
        return 2 * M * (N * K + r * (K + N)) / triton.testing.do_bench(run) * 1e-9

    if INTERPRETING:
        print("TFLOP/s need a GPU: under Triton's interpreter the kernels run on the CPU")
    else:
        benchmark.run(print_data=True)
