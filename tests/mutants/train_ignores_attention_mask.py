"""Mutant: the forward pass gets input_ids only, so the padding's attention_mask is lost (left padding shows it)."""

from lora_lab.loss import next_token_loss
from lora_lab.model import apply_qlora  # noqa: F401  (the model is right)

EXPECTED_FAILURE = "training.matches_reference"


def training_step(model, batch, optimizer):
    loss = next_token_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
