"""Mutant: training_step calls model.requires_grad_(True) "so backward always works", un-freezing the base model."""

from lora_lab.model import apply_qlora  # noqa: F401  (the model is right)
from lora_lab.train import training_step as reference_step

EXPECTED_FAILURE = "training.base_untouched"


def training_step(model, batch, optimizer):
    model.requires_grad_(True)
    return reference_step(model, batch, optimizer)
