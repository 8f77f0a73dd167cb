"""Mutant: training_step never clears the gradients, so each step uses the sum of all gradients so far."""

from lora_lab.model import apply_qlora  # noqa: F401  (the model is right)
from lora_lab.train import backward, compute_loss, forward

EXPECTED_FAILURE = "training.matches_reference"


def training_step(model, batch, optimizer):
    loss = compute_loss(forward(model, batch), batch["labels"])
    backward(loss)
    optimizer.step()
    return loss.item()
