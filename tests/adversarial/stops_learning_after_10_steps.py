"""Exploit: training_step stops updating after 10 calls (it returns the loss, but the optimizer no longer steps): a suite
whose longest run is 10 steps sees a model that learns."""

from lora_lab.model import apply_qlora as reference_apply
from lora_lab.train import training_step as reference_step

REJECTED_BY = "training.converges_like_reference"
_calls = {}


def apply_qlora(model, **kwargs):
    return reference_apply(model, **kwargs)


def training_step(model, batch, optimizer):
    _calls[id(model)] = _calls.get(id(model), 0) + 1
    if _calls[id(model)] <= 10:
        return reference_step(model, batch, optimizer)
    from lora_lab.train import compute_loss, forward

    return compute_loss(forward(model, batch), batch["labels"]).item()
