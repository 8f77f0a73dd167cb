"""Mutant: training_step reports the loss measured after the update (which flatters the training curve)."""

import torch

from lora_lab.model import apply_qlora  # noqa: F401  (the model is right)
from lora_lab.train import backward, compute_loss, forward, optimize

EXPECTED_FAILURE = "training.returns_loss_before_update"


def training_step(model, batch, optimizer):
    backward(compute_loss(forward(model, batch), batch["labels"]))
    optimize(optimizer)
    with torch.no_grad():
        return compute_loss(forward(model, batch), batch["labels"]).item()
