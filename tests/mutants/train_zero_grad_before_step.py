"""Mutant: training_step clears the gradients between backward and optimizer.step(), so nothing is learned."""

from lora_lab.model import apply_qlora  # noqa: F401  (the model is right)
from lora_lab.train import backward, compute_loss, forward

EXPECTED_FAILURE = "training.lowers_loss"


def training_step(model, batch, optimizer):
    loss = compute_loss(forward(model, batch), batch["labels"])
    backward(loss)
    optimizer.zero_grad()
    optimizer.step()
    return loss.item()
