"""Exercise 08: the fused QLoRA forward as one Triton kernel (and, as a stretch, the backward).

Lecture step 1, the forward pass, fused; the stretch is step 3, the backward
pass. Exercise 03 computed

    y = x @ W^T + bias + scaling * (x @ A^T) @ B^T

by dequantizing all of W into memory first: for a 4096 x 4096 projection that
writes and reads 32 MB (fp16) per call to save 8 MB of storage. The fused
kernel decodes each tile of W in registers, right before the matmul that uses
it, so W only ever crosses memory at half a byte per weight. And since the LoRA
down-projection ``x @ A^T`` reads the same tile of x, it rides along in the
same loop for almost nothing.

The algorithm (Triton's matmul tutorial, plus two fusions)
----------------------------------------------------------
x is (M, K) (flatten the leading dimensions), W is (N, K), A is (r, K), B (N, r).
Each program owns one (BLOCK_M, BLOCK_N) tile of y and walks K in steps of
BLOCK_K, accumulating in fp32:

    acc = zeros(BLOCK_M, BLOCK_N);  xa = zeros(BLOCK_M, R_PAD)
    for k0 in range(0, K, BLOCK_K):
        x_tile = x[m-tile, k0:k0+BLOCK_K]                        load
        w_tile = decode(W[n-tile, k0:k0+BLOCK_K])                NF4 -> fp32 in registers (exercise 07's formula)
        acc   += x_tile @ w_tile^T                               tl.dot(x_tile, tl.trans(w_tile), acc)
        xa    += x_tile @ A[:, k0:k0+BLOCK_K]^T                  the LoRA down-projection, r wide
    acc += scaling * xa @ B[n-tile, :]^T  (+ bias)               the epilogue
    store acc into y[m-tile, n-tile]

Decoding: weight element (n, k) has flat index ``e = n * K + k``; its code is
the high nibble of ``packed[e // 2]`` when ``e`` is even, else the low nibble;
its value is ``NF4_CODE[code] * absmax[e // blocksize]``.

Practical rules
---------------
* Compute in fp32: cast A, B and the bias to x's dtype (the contract), then
  everything to fp32 on the host; the kernel writes an fp32 y and the host
  rounds it to x's dtype once. Use ``input_precision="ieee"`` in ``tl.dot``: on
  a GPU fp32 dots default to TF32 (10-bit mantissa), too coarse for the grader.
* ``tl.dot`` wants every dimension to be at least 16 and ``tl.arange`` wants
  powers of two: pad r to ``R_PAD = max(16, triton.next_power_of_2(r))`` and mask
  the loads of A and B with ``offs_r < R``. Mask rows and columns past M and N too.
* Take the per-block absmax from ``weight.absmax_fp32()`` (handles double quant).
* In every graded case K is a multiple of the NF4 blocksize (at least 32), so
  with ``BLOCK_K = 32`` no mask is needed along K; raise ValueError otherwise.
* Start simple if you like: the base path alone in the kernel and the LoRA path
  in torch passes the forward check too. Then fuse it.

The spec
--------
``qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None)``: exercise 03's
contract (same shapes, dtypes, errors), computed by your kernel. It is written
below: it validates with your ``check_operands`` and runs ``QLoRAFunction``,
whose ``forward`` calls your ``launch_forward``. Its ``backward`` is the
stretch, graded by ``qlora.gradients_match_float64``:

    dX = dY @ W + scaling * (dY @ B) @ A      dA = scaling * (dY @ B)^T @ X
    dB = scaling * dY^T @ (X @ A^T)           d(bias) = dY summed over rows        (W gets none)

dA, dB and d(bias) are small matmuls: torch is fine for them. dX needs W: a
second kernel that decodes W tile by tile, like the forward, is the real stretch.
Whatever your backward does, keep the NF4 weight itself for it, never W dequantized
(``memory.qlora_linear_keeps_no_dense_weight``, 5 points: a forward with no backward
keeps nothing and earns them too).

The grader passes CPU tensors and runs Triton under its interpreter (slow but
exact); shapes are drawn: M = 1, N not a multiple of any tile, r from 1 to 64.
The interpreter runs code a GPU would refuse (``tl.dot`` with a dimension under
16, for one), so the last check (``triton.compiles_for_gpu``, 5 points) compiles
your kernels for an H100 (sm_90a) and an A100 (sm_80) with the arguments your
calls launched them with, at r = 3 among others; no GPU is needed for that. A
compile error costs its points and shows Triton's message; a spill is a hint.

Grading: ``lora-lab grade --only 08`` (or ``python exercises/ex08_triton_forward.py``).

The reference solution is kernels/qlora_forward.py (the kernel),
kernels/fused_qlora_linear.py (the autograd Function and the checks) and
kernels/qlora_backward.py (the dX kernel); helpers in kernels/common.py. Try first!
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must be set before any @triton.jit below runs (as lora_lab.kernels does)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lora_lab.nf4 import NF4_CODE, NF4Tensor  # noqa: E402, F401

BLOCK_M, BLOCK_N, BLOCK_K = 32, 32, 32  # tile sizes: powers of two, at least 16


@triton.jit
def qlora_forward_kernel(
    x_ptr,  # fp32 [M, K], contiguous
    packed_ptr,  # uint8 [ceil(N * K / 2)]: the NF4 codes of W (N, K), element 2i in the high nibble
    levels_ptr,  # fp32 [16]: NF4_CODE
    absmax_ptr,  # fp32 [N * K / NF4_BLOCKSIZE]: one absmax per NF4 block of the flattened W
    a_ptr,  # fp32 [R, K], contiguous: lora_A
    b_ptr,  # fp32 [N, R], contiguous: lora_B
    bias_ptr,  # fp32 [N] (read only when HAS_BIAS; any tensor otherwise)
    y_ptr,  # fp32 [M, N], contiguous: the output
    M, N, K, R,  # sizes
    scaling,  # alpha / r
    NF4_BLOCKSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    R_PAD: tl.constexpr,  # R padded to a power of two >= 16
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # TODO (exercise 08): which tile (tl.program_id(0) -> pid_m, pid_n), the K loop with the decoded W tile, the epilogue.
    pass


def check_operands(x, weight, lora_A, lora_B, bias) -> None:
    """Exercise 03's shape and type rules (ValueError/TypeError naming what was expected), plus K % blocksize == 0."""
    raise NotImplementedError("exercise 08: write check_operands")


def launch_forward(
    x2d: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """fp32 y (M, N) from fp32 contiguous x2d (M, K), A (r, K), B (N, r) and bias (N,): one launch of the kernel.

    One program per output tile: ``grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N),)``.
    """
    raise NotImplementedError("exercise 08: launch qlora_forward_kernel from launch_forward")


class QLoRAFunction(torch.autograd.Function):
    """Given forward (casts, then your launch); the backward is the stretch."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, scaling, bias):
        K, N = x.shape[-1], weight.shape[0]
        x2d = x.reshape(-1, K)
        as_x = lambda t: None if t is None else t.to(x.dtype).float().contiguous()  # noqa: E731
        y = launch_forward(as_x(x2d), weight, as_x(lora_A), as_x(lora_B), scaling, as_x(bias))
        ctx.save_for_backward(x2d, lora_A, lora_B)
        ctx.weight, ctx.scaling, ctx.x_shape, ctx.has_bias = weight, scaling, x.shape, bias is not None
        return y.to(x.dtype).reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, grad_y):
        """Return (dX, None, dA, dB, None, d(bias) or None), each in the dtype of its input."""
        raise NotImplementedError("exercise 08 (stretch): write QLoRAFunction.backward")


def qlora_linear(
    x: torch.Tensor,
    weight: NF4Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Given: ``y = x @ W^T + bias + scaling * (x @ A^T) @ B^T`` through your kernel."""
    check_operands(x, weight, lora_A, lora_B, bias)
    return QLoRAFunction.apply(x, weight, lora_A, lora_B, float(scaling), bias)


if __name__ == "__main__":  # python exercises/ex08_triton_forward.py grades this file alone
    from lora_lab.conformance.grading.command import main

    raise SystemExit(main(["--only", "08", "--path", os.path.dirname(os.path.abspath(__file__))]))
