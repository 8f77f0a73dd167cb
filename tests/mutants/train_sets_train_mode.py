"""Mutant: training_step calls model.train() first, silently undoing a caller's model.eval() (dropout comes back on)."""

from lora_lab.model import apply_qlora  # noqa: F401  (the model is right)
from lora_lab.train import training_step as reference_step

EXPECTED_FAILURE = "training.returns_loss_before_update"


def training_step(model, batch, optimizer):
    model.train()
    return reference_step(model, batch, optimizer)
