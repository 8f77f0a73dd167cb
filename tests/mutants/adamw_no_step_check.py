"""Mutant: AdamW written from the formulas, but without refusing step < 1: step 0 divides by 1 - beta ** 0 = 0."""

import torch

EXPECTED_FAILURE = "adamw.first_step_moves_by_lr"


@torch.no_grad()
def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    beta1, beta2 = betas
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)  # ZeroDivisionError for step 0
    denominator = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    param.mul_(1 - lr * weight_decay).addcdiv_(exp_avg, denominator, value=-step_size)
