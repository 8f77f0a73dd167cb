"""Mutant: AdamW without bias correction, so the first steps are too small (m and v start at zero)."""

import torch

EXPECTED_FAILURE = "adamw.first_step_moves_by_lr"


@torch.no_grad()
def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - betas[0])
    exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-lr)
