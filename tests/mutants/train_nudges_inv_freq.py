"""Mutant: a training_step that also "adapts" the rotary inv_freq buffer (non-persistent, so not in the state dict)."""

import torch

from lora_lab.model import apply_qlora  # noqa: F401  (the reference: only the step is broken)
from lora_lab.train import training_step as _reference

EXPECTED_FAILURE = "training.base_untouched"


def training_step(model, batch, optimizer):
    loss = _reference(model, batch, optimizer)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
                module.inv_freq.mul_(1 + 1e-6)
    return loss
