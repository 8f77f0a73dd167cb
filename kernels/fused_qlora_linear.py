"""``fused_qlora_linear``: the QLoRA linear op with a fused forward kernel and a fused backward.

The op is ``y = x @ W^T + bias + scaling * (x @ A^T) @ B^T`` with the frozen
weight W in NF4: the contract of ``lora_lab.lora.qlora_linear``. Its gradients,
with ``X`` the input flattened to (M, K) and ``dY`` the output gradient (M, N):

    dX    = dY @ W + scaling * (dY @ B) @ A        the second fused kernel (qlora_backward.py)
    dA    = scaling * (dY @ B)^T @ X               (r, K)
    dB    = scaling * dY^T @ (X @ A^T)             (N, r)
    dbias = sum of dY over the rows                (N,)
    dW    = none: W is frozen

Only dX touches W, so only dX needs a kernel that decodes NF4. The r-wide
products ``X @ A^T`` and ``dY @ B`` are each computed once per call, by one
torch matmul (cuBLAS on a GPU), rounded to x's dtype as the reference rounds
them: the kernels read them in their epilogues, and dB and dA reuse them. dA
and dB are ordinary dense matmuls with one r-wide operand; they run as torch
matmuls, which are as fast as anything we could write for them. What autograd
keeps between the passes is X, ``X @ A^T`` (M x r), and A and B in x's dtype:
never W dequantized.

A, B and the bias are cast to x's dtype first, as the reference does, and
their gradients are cast back to their own dtypes.

Which kernels, by M and dtype
-----------------------------
The right kernel depends on the rows M (batch x sequence), as in bitsandbytes
and Unsloth (``LAUNCHES`` lists what each path runs per call):

- ``M <= 16`` (decoding): ``qlora_small_m.py``, split-K over W, so that a
  layer that is all weight-reading keeps every SM streaming W.
- ``16 < M < DENSE_FROM_M``: the fused kernels, W decoded tile by tile in
  registers, with tiles small enough that every SM gets a program (``tiles.py``).
- ``M >= DENSE_FROM_M`` (training, long prefill): the fused kernels decode
  each W tile once per row tile, ``cdiv(M, BLOCK_M)`` times in all, and at
  large M that decoding costs more than decoding W once, so ``nf4_dequantize``
  writes W once, straight in x's dtype, and cuBLAS multiplies. The small
  product comes first: ``addmm`` writes ``bias + scaling * xa @ B^T`` into y
  (it reads only r-wide operands), then ``y.addmm_(x, W^T)`` accumulates the
  GEMM on W into it. cuBLAS reads y in the epilogue of a compute-bound GEMM,
  where the read hides under the math; the other order (base GEMM first, then
  an ``addmm_`` of the adapter) reads y back and writes it again in a
  memory-bound kernel of its own. dX is arranged the same way. The dense W is
  a temporary of one pass: freed after its matmul, recycled by torch's
  caching allocator on the next call rather than kept in a workspace (a
  buffer alive between calls would be a dense weight kept, which
  ``memory.qlora_linear_keeps_no_dense_weight`` rightly refuses).

- fp32 x above ``SMALL_M`` rows (and dX at every M): the dense path. Without
  tensor cores (TF32 would round to a 10-bit mantissa, outside fp32's
  tolerance), tl.dot in IEEE precision is scalar FMAs with the operands in
  registers, where cuBLAS's SGEMM is tuned; matmuls run with TF32 off even if
  the caller allowed it. Decoding (M <= 16) stays on the small-M kernel, which
  reads W at half a byte per weight where the dense path writes and reads 8.

``LORA_LAB_KERNEL_PATH=fused`` or ``=dense`` forces one path for every M
(tests and the benchmark compare them; fp32 stays dense).

Where the threshold comes from. No GPU has timed these paths yet, so
``DENSE_FROM_M`` comes from the static model (``lora-lab bench --plan``, the
forward of Llama-3.1-8B's layers in bf16 at r = 16) until one does. The dense
path pays a fixed cost per call, dequantizing W (about 14 us for a 4096 x 4096
layer on an H100) plus a launch or two, where the fused one pays for decoding
again per row tile; the model puts the crossing between M = 2048 and 3072 on
an H100, near 1536 on an H200 and near 1024 on an A100. For a whole decoder
layer (q, k, v, o, gate, up, down) it predicts, against the faster of the two
paths at each M:

    M       all fused: H100 / H200 / A100     all dense: H100 / H200 / A100
    1024        +0.0% / +0.0% / +2.1%             +16.0% / +7.2% / +0.6%
    2048        +0.2% / +3.0% / +7.8%             +2.6% / +0.2% / +0.0%
    4096        +4.7% / +8.5% / +11.5%            +0.0% / +0.0% / +0.0%

So one threshold for every GPU and layer, 2048, is right in the clear cases
(fused at 1024, where it wins by 16% on an H100 and 7% on an H200 and is 1.5%
behind on an A100; dense from 4096, where it wins on every GPU) and within 5%
of the better path in between (an A100 at 1536 the worst). The model
covers the forward only; dX switches at the same M. A GPU measurement should
replace these numbers; ``LORA_LAB_KERNEL_PATH`` forces either path to measure
both.
"""

from __future__ import annotations

import contextlib
import os

import torch
from lora_lab.kernels.common import check_block_multiple, check_device, check_interpreter_numpy, dtype_kind
from lora_lab.kernels.nf4_dequantize import nf4_dequantize
from lora_lab.kernels.qlora_backward import qlora_grad_input
from lora_lab.kernels.qlora_forward import qlora_forward
from lora_lab.kernels.qlora_small_m import LAUNCHES as SMALL_M_LAUNCHES
from lora_lab.kernels.qlora_small_m import SMALL_M, qlora_small_m_forward

from lora_lab.nf4 import FLOAT_DTYPES, NF4Tensor
from lora_lab.operands import check_qlora_operands

DENSE_FROM_M = 2048  # from here on W is dequantized once per pass: the static model's crossing (docstring)
PATHS = ("auto", "fused", "dense")
FORCED_PATH = os.environ.get("LORA_LAB_KERNEL_PATH", "auto")
if FORCED_PATH not in PATHS:
    raise ValueError(f"LORA_LAB_KERNEL_PATH must be one of {', '.join(PATHS)}, got {FORCED_PATH!r}")

# What each path launches per call, in order: Triton kernels by name, torch matmuls as "aten.<op>" (cuBLAS on a GPU).
# "forward" and "grad_input" (dX) per path; dA and dB add one aten.mm each to any backward, dbias an aten.sum.
# The dense forward is listed with a bias: without one, its aten.addmm (bias + the LoRA term) is an aten.mm.
# The small-M forward is qlora_small_m_forward's two kernels (qlora_small_m.LAUNCHES).
# (lora_lab.bench.plan may read these; tests/triton_kernels/test_kernels.py counts the launches against them.)
LAUNCHES = {
    "small_m": {"forward": SMALL_M_LAUNCHES, "grad_input": ("aten.mm", "qlora_grad_input_kernel")},
    "fused": {"forward": ("aten.mm", "qlora_forward_kernel"),
              "grad_input": ("aten.mm", "qlora_grad_input_kernel")},
    "dense": {"forward": ("aten.mm", "aten.addmm", "nf4_dequantize_kernel", "aten.addmm_"),
              "grad_input": ("aten.mm", "aten.mm", "nf4_dequantize_kernel", "aten.addmm_")},
}


def kernel_path(m: int, dtype: torch.dtype = torch.bfloat16) -> str:
    """``"small_m"``, ``"fused"`` or ``"dense"``: the forward path for ``m`` rows of ``dtype`` (see the docstring)."""
    if FORCED_PATH != "auto":
        path = FORCED_PATH
    elif m <= SMALL_M:
        path = "small_m"
    else:
        path = "dense" if m >= DENSE_FROM_M else "fused"
    return "dense" if path == "fused" and dtype == torch.float32 else path


def grad_input_path(m: int, dtype: torch.dtype = torch.bfloat16) -> str:
    """``"fused"`` or ``"dense"``: the path of dX, which has no small-M kernel of its own and, in fp32, no fused one."""
    return "dense" if dtype == torch.float32 or kernel_path(m, dtype) == "dense" else "fused"


@contextlib.contextmanager
def ieee_fp32_matmuls():
    """cuBLAS multiplies fp32 in IEEE precision inside the block, even where the caller allowed TF32 globally."""
    settings = torch.backends.cuda.matmul
    if not settings.allow_tf32:
        yield
        return
    settings.allow_tf32 = False
    try:
        yield
    finally:
        settings.allow_tf32 = True


def lora_term(xa, b, scaling, bias_x) -> tuple[torch.Tensor, float]:
    """The dense path's first write of y: ``bias + scaling * xa @ B^T``, or ``xa @ B^T`` and the scale still to apply.

    The big GEMM then accumulates into it: ``y.addmm_(x, W^T, beta=scale)``
    gives ``x @ W^T + scale * y``. With a bias, the scaling goes in this small
    matmul's alpha and the big one adds with beta = 1; without one, the small
    matmul is a plain mm and the big one scales it by beta, so no dummy input
    (or zero-fill kernel) is needed. Either way one launch, one M x N write.
    """
    if bias_x is None:
        return torch.mm(xa, b.t()), scaling
    return torch.addmm(bias_x, xa, b.t(), alpha=scaling), 1.0


def dense_forward(x2d, weight, xa, b, scaling, bias_x) -> torch.Tensor:
    """``x @ W^T + bias + scaling * xa @ B^T``: the LoRA term written first, then the GEMM on W accumulates into it.

    The order is the traffic: written the other way round (base GEMM, then
    ``addmm_`` of the adapter) the r-wide product reads y back and writes it
    again, two M x N passes of a memory-bound kernel. Here the memory-bound
    kernel writes y once (it reads only xa and B, both r wide), and the read of
    y happens inside the compute-bound GEMM, as cuBLAS's epilogue reads C, where
    it costs no time.
    """
    with ieee_fp32_matmuls():
        y, beta = lora_term(xa, b, scaling, bias_x)
        dense = nf4_dequantize(weight, x2d.dtype)
        return y.addmm_(x2d, dense.t(), beta=beta)  # dense is freed when the call returns


def dense_grad_input(dy, weight, dyb, a, scaling) -> torch.Tensor:
    """``dY @ W + scaling * dyb @ A``: ``dyb @ A`` written first, then the GEMM on W accumulates it with beta = scaling."""
    with ieee_fp32_matmuls():
        grad_x = torch.mm(dyb, a)
        dense = nf4_dequantize(weight, dy.dtype)
        return grad_x.addmm_(dy, dense, beta=scaling)


class FusedQLoRALinear(torch.autograd.Function):
    """Forward and dX: fused Triton kernels or dequantize + cuBLAS, by M; dA, dB and dbias from the r-wide products."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, scaling, bias):
        K, N = x.shape[-1], weight.shape[0]
        x2d = x.reshape(-1, K)
        a = lora_A.to(x.dtype).contiguous()
        b = lora_B.to(x.dtype).contiguous()
        bias_x = None if bias is None else bias.to(x.dtype).contiguous()
        path = kernel_path(x2d.shape[0], x.dtype)
        if x2d.shape[0] == 0:  # an empty batch: nothing to launch, no W to decode
            y, xa = x2d.new_empty((0, N)), x2d.new_empty((0, a.shape[0]))
        elif path == "small_m":
            y, xa = qlora_small_m_forward(x2d, weight, a, b, scaling, bias_x)
        else:
            with ieee_fp32_matmuls():
                xa = x2d @ a.t()  # once per call, rounded to x's dtype as the reference rounds it
            if path == "dense":
                y = dense_forward(x2d, weight, xa, b, scaling, bias_x)
            else:
                y, _ = qlora_forward(x2d, weight, a, b, scaling, bias_x, xa)
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
        with ieee_fp32_matmuls():
            dyb = dy @ b if need_x or need_A else None  # once per call: dX's epilogue and dA share it
            if need_x and dy.shape[0] == 0:
                grad_x = dy.new_empty(ctx.x_shape)
            elif need_x and grad_input_path(dy.shape[0], dy.dtype) == "dense":
                grad_x = dense_grad_input(dy, ctx.weight, dyb, a, ctx.scaling).reshape(ctx.x_shape)
            elif need_x:
                grad_x = qlora_grad_input(dy, ctx.weight, a, b, ctx.scaling, dyb)[0].reshape(ctx.x_shape)
            if need_A:
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
    x's dtype. Differentiable in x, A, B and bias, never in W. In fp16 and bf16
    below ``DENSE_FROM_M`` rows W is decoded tile by tile inside the kernels, in
    the forward and again in the backward, so no dense copy of it is made; from
    there on, and in fp32 (but the small-M forward), each pass dequantizes W into a temporary
    (N x K in x's dtype, freed after its matmul), as bitsandbytes does;
    ``LORA_LAB_KERNEL_PATH=fused`` keeps the no-copy path at every M in fp16/bf16.
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
            x_names=["M"], x_vals=[16, 256, 1024, 2048, 4096], line_arg="provider", line_vals=["fused", "cublas"],
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
            run = lambda: torch.mm(x @ lora_A.t(), lora_B.t()).addmm_(x, dense.t(), beta=2.0)  # noqa: E731
        return 2 * M * (N * K + r * (K + N)) / triton.testing.do_bench(run) * 1e-9

    if INTERPRETING:
        print("TFLOP/s need a GPU: under Triton's interpreter the kernels run on the CPU")
    else:
        benchmark.run(print_data=True)
