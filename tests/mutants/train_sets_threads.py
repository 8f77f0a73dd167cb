"""Mutant: a training_step that pins torch to one more thread each call and leaves it so for the caller."""

import torch

from lora_lab.model import apply_qlora  # noqa: F401  (the reference: only the step is broken)
from lora_lab.train import training_step as _reference

EXPECTED_FAILURE = "training.converges_like_reference"


def training_step(model, batch, optimizer):
    torch.set_num_threads(torch.get_num_threads() + 1)
    return _reference(model, batch, optimizer)
