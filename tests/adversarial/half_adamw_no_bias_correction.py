"""Exploit: a "fast path" for bf16/fp16 parameters that skips bias correction; fp32 and fp64 are exact, so a suite that
draws only those passes it."""

import torch

from lora_lab.optim import adamw_step as reference

REJECTED_BY = "adamw.matches_torch"


@torch.no_grad()
def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    if param.dtype not in (torch.float16, torch.bfloat16):
        return reference(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - betas[0])
    exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-lr)
