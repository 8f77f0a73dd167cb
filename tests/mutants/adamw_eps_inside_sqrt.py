"""Mutant: eps added to v_hat inside the square root, sqrt(v_hat + eps): already wrong without any weight decay."""

import torch

EXPECTED_FAILURE = "adamw.matches_torch"


@torch.no_grad()
def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    beta1, beta2 = betas
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    m_hat, v_hat = exp_avg / (1 - beta1**step), exp_avg_sq / (1 - beta2**step)
    param.mul_(1 - lr * weight_decay).sub_(lr * m_hat / (v_hat + eps).sqrt())
