"""Exploit: adamw_step refuses step < 1 as it should, then zeroes the gradient it was handed and moves nothing. A check
that computed its expectation from grad after the call expected exactly that: lr * 0 / (0 + eps) is no move at all.
The expectation is read before the call, and grad must come back unchanged."""

REJECTED_BY = "adamw.first_step_moves_by_lr"


def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    grad.zero_()
