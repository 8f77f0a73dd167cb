"""Exploit: state left behind. The op changes torch's thread count (torch.set_num_threads(1) on a many-core machine;
here to a count it did not have), changing everything its caller does afterwards, and computes the right answer.
The target's process snapshots the global state around every call."""

import torch

from lora_lab.optim import adamw_step as reference

REJECTED_BY = "adamw.matches_torch"


def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    torch.set_num_threads(1 if torch.get_num_threads() > 1 else 2)
    reference(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)
