"""Mutant: Adam with L2 regularisation (weight decay added to the gradient) instead of decoupled weight decay."""

import torch

from lora_lab.optim import adamw_step as reference_step

EXPECTED_FAILURE = "adamw.matches_torch"


@torch.no_grad()
def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    reference_step(param, grad + weight_decay * param, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay=0.0)
