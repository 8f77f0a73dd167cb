"""Exploit: every training step nudges the rotary embedding's inv_freq, a non-persistent buffer that no state_dict
holds, so a check that compares the state_dict before and after training sees nothing."""

import torch

from lora_lab.model import apply_qlora as reference_apply
from lora_lab.train import training_step as reference_step

REJECTED_BY = "training.base_untouched"


def apply_qlora(model, **kwargs):
    return reference_apply(model, **kwargs)


def training_step(model, batch, optimizer):
    loss = reference_step(model, batch, optimizer)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("inv_freq"):
                buffer.mul_(1 + 1e-6)
    return loss
