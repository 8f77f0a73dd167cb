"""Mutant: adamw_step without torch.no_grad(): on a parameter that requires grad (as a model's do) the in-place update raises."""

from lora_lab.optim import adamw_step as reference_step

EXPECTED_FAILURE = "adamw.matches_torch"


def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    param.mul_(1 - lr * weight_decay)  # outside no_grad: a leaf that requires grad refuses this
    reference_step(param.data, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay=0.0)
