"""Mutant: scales grad in place by a power of two as scratch space and scales it back, exactly; the caller's tensor was
still written, under anyone reading it meanwhile (another thread, a gradient hook)."""

import torch

from lora_lab.optim import adamw_step as _reference

EXPECTED_FAILURE = "adamw.matches_torch"


@torch.no_grad()
def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    grad.mul_(2.0)
    _reference(param, grad / 2.0, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)
    grad.div_(2.0)
