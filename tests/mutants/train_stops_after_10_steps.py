"""Mutant: a training_step that does the four steps for its first 10 calls, then only reports the loss."""

import torch

from lora_lab.loss import next_token_loss
from lora_lab.model import apply_qlora  # noqa: F401  (the reference: only the step is broken)
from lora_lab.train import training_step as _reference

EXPECTED_FAILURE = "training.converges_like_reference"
_calls = {}


def training_step(model, batch, optimizer):
    _calls[id(model)] = _calls.get(id(model), 0) + 1
    if _calls[id(model)] <= 10:
        return _reference(model, batch, optimizer)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return next_token_loss(logits, batch["labels"]).item()
