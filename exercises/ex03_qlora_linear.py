"""Exercise 03: the QLoRA linear layer, a frozen NF4 weight plus a small trainable update.

Lecture step 1, the forward pass, and, through autograd, step 3, the backward
pass. Every attention projection of a QLoRA model (q, k, v, o) is this op.

The idea
--------
Fine-tuning all of a weight W (N x K) means training N*K numbers. LoRA trains a
low-rank *update* instead: two thin matrices, A (r x K) and B (N x r), with r
much smaller than K and N (r = 8 for a 4096 x 4096 projection trains 65,536
numbers instead of 16.8 million). QLoRA adds that W itself is frozen in NF4
(exercise 01), so the only full-size thing in memory is 4 bits per weight.

    y = x @ W^T + bias + scaling * (x @ A^T) @ B^T           scaling = alpha / r

* Go through the r-wide intermediate ``x @ A^T`` and never form ``B @ A``
  (N x K): that would cost as much as the full weight.
* ``scaling = alpha / r`` keeps the size of the update the same when you change
  r, so a learning rate tuned at one rank still works at another.
* B starts at zero, so a fresh layer computes exactly the frozen model; the
  ``QLoRALinear`` module does that initialization, this op just computes.
* W is frozen: dequantize it with no gradient. Gradients flow to x (so earlier
  layers' adapters learn), A, B and the bias:

      dX = dY W + s (dY B) A,    dA = s (dY B)^T X,    dB = s dY^T (X A^T),    d(bias) = sum of dY

* Keep nothing N x K between forward and backward (graded, 5 points). Plain
  autograd through ``x @ W^T`` saves the dequantized W for dX, which throws away
  QLoRA's memory saving: write a ``torch.autograd.Function`` for the base path
  whose ``backward`` dequantizes W again (the LoRA path can stay plain autograd).

The spec
--------
``qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None) -> y``

* ``x`` is (..., K) in float32, float16 or bfloat16: keep every leading
  dimension (a batch of sequences is (batch, seq, K)). ``weight`` is an
  ``NF4Tensor`` of shape (N, K). ``lora_A`` is (r, K), ``lora_B`` (N, r),
  ``bias`` (N,) or None. ``y`` is (..., N) in x's dtype.
* Cast W (dequantized), A, B and the bias to x's dtype before multiplying; the
  adapters are often kept in fp32 while x is bf16.
* Differentiable in x, A, B and bias, never in the weight.
* Check the shapes first and raise ValueError (TypeError for a non-float x) that
  names what was expected: x's last dimension must be K, A (r, K), B (N, r), bias (N,).

The grader compares with the formula computed in float64, with a tolerance
derived from the dtype and K, for drawn odd shapes (M = 1, N such as 93, 3-D x, r from
1 to 64), and with peft's LoRA on a bitsandbytes ``Linear4bit``, the layer
people actually fine-tune with. It calls your function twice with the same
shapes and new values, and checks that you leave the inputs unchanged.

You may use ``lora_lab.nf4.dequantize_nf4`` (or your own from exercise 01).

Grading: ``lora-lab grade --only 03`` (or ``python exercises/ex03_qlora_linear.py``).

The reference solution is lora_lab/lora.py (``qlora_linear``, ``base_path``,
``lora_path`` and ``_FrozenNF4Linear``). Try first!
"""

from __future__ import annotations

import torch

from lora_lab.nf4 import NF4Tensor, dequantize_nf4  # noqa: F401  (or: from ex01_nf4 import dequantize_nf4)


def qlora_linear(
    x: torch.Tensor,
    weight: NF4Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ W^T + bias + scaling * (x @ A^T) @ B^T`` with W frozen in NF4; y is (..., N) in x's dtype."""
    # 1. validate the shapes   2. the frozen base path   3. the scaled LoRA path through r numbers
    raise NotImplementedError("exercise 03: write qlora_linear")


if __name__ == "__main__":  # python exercises/ex03_qlora_linear.py grades this file alone
    import os

    from lora_lab.conformance.grading.command import main

    raise SystemExit(main(["--only", "03", "--path", os.path.dirname(os.path.abspath(__file__))]))
