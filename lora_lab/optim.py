"""Step 4 of the lecture: the optimizer, AdamW written out.

For each trainable tensor AdamW keeps two running averages of its gradient g:

    m = beta1 * m + (1 - beta1) * g        the direction (momentum)
    v = beta2 * v + (1 - beta2) * g * g    the typical size of g, per element

Both start at zero, so early on they are too small; dividing by
(1 - beta^step) undoes that ("bias correction", which is why ``step`` counts from
1). The update moves each element by about ``lr`` in the direction of m, scaled
by 1/sqrt(v) so that every element learns at a similar pace whatever the size of
its gradient. Weight decay is *decoupled* (the W in AdamW): it shrinks the
parameter directly, ``p -= lr * weight_decay * p``, instead of being added to
the gradient, where Adam's scaling would distort it.

The operations and their order mirror ``torch.optim.AdamW``'s single-tensor
path, so the results are bit-identical with it on the CPU.
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
    """One AdamW update of ``param`` in place; ``exp_avg`` (m) and ``exp_avg_sq`` (v) are updated in place too.

    ``step`` is the number of this update, starting from 1.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"expected step to be the update's number, counting from 1, got {step!r}")
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)  # decoupled weight decay
    exp_avg.lerp_(grad, 1 - beta1)  # m = beta1 * m + (1 - beta1) * g
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v = beta2 * v + (1 - beta2) * g^2
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denominator = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)  # sqrt(v_hat) + eps
    param.addcdiv_(exp_avg, denominator, value=-step_size)  # p -= lr * m_hat / (sqrt(v_hat) + eps)


class AdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` for tensors with a gradient, driving ``adamw_step``; interchangeable in ``training_step``."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"expected lr, eps, weight_decay >= 0 and betas in [0, 1), got {lr}, {eps}, {weight_decay}, {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:  # frozen or unused this step: no update, not even weight decay
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                adamw_step(
                    param, param.grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                    lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                )
        return loss
