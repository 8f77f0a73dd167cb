"""Exercise 05: AdamW, one update by hand.

Lecture step 4, optimization: turn each adapter's gradient (step 3) into a
change of the adapter. In QLoRA only the LoRA matrices A and B are updated;
the NF4 base weights never change. AdamW is what QLoRA (and nearly every LLM
fine-tune) uses, and it is also where most of the training memory of a full
fine-tune goes: two running averages per trained number, which LoRA makes small.

The idea
--------
For each trainable tensor p with gradient g, AdamW keeps two running averages,
both starting at zero:

    m = beta1 * m + (1 - beta1) * g            the direction (momentum)
    v = beta2 * v + (1 - beta2) * g * g        the typical size of g, per element

Because they start at zero they are too small early on; dividing by
(1 - beta ** step) corrects that ("bias correction"; ``step`` counts from 1):

    m_hat = m / (1 - beta1 ** step)
    v_hat = v / (1 - beta2 ** step)
    p     = p - lr * weight_decay * p                      decoupled weight decay (first, on the old p)
    p     = p - lr * m_hat / (sqrt(v_hat) + eps)

Dividing by sqrt(v_hat) gives every element a step of about ``lr``, whatever
the scale of its gradient. Weight decay is *decoupled* (the W in AdamW): it
shrinks p directly. Adding ``weight_decay * p`` to the gradient instead (L2
regularization, plain Adam) lets Adam's scaling distort it, and it is a
different optimizer.

The spec
--------
``adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)``

* Updates ``param``, ``exp_avg`` (m) and ``exp_avg_sq`` (v) IN PLACE and returns
  None. ``grad`` is left unchanged.
* ``step`` is the number of this update, counting from 1; raise ValueError for
  ``step < 1``.
* It must equal ``torch.optim.AdamW`` with the same settings, step after step.
  torch adds ``eps`` after the bias correction, to ``sqrt(v) / sqrt(1 - beta2 ** step)``,
  not to ``sqrt(v)``; the grader allows only rounding differences, so do the same.
* Run it under ``torch.no_grad()`` (an in-place update of a leaf that requires
  grad is otherwise an error).

Grading: ``lora-lab grade --only 05`` (or ``python exercises/ex05_adamw.py``).

The reference solution is lora_lab/optim.py (``adamw_step``). Try first!
"""

from __future__ import annotations

import torch


@torch.no_grad()
def adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> None:
    """One AdamW update of ``param`` in place; ``exp_avg`` (m) and ``exp_avg_sq`` (v) are updated in place too."""
    raise NotImplementedError("exercise 05: write adamw_step")


if __name__ == "__main__":  # python exercises/ex05_adamw.py grades this file alone
    import os

    from lora_lab.conformance.grading.command import main

    raise SystemExit(main(["--only", "05", "--path", os.path.dirname(os.path.abspath(__file__))]))
