"""Mutant: adapter dropout via F.dropout(x, p), whose training flag defaults to True, so eval() still drops."""

import types

import torch.nn.functional as F

from lora_lab.lora import base_path, lora_path
from lora_lab.model import apply_qlora as reference_apply

EXPECTED_FAILURE = "qlora.apply_dropout_only_in_training"


def _forward(self, x):
    p = getattr(self.lora_dropout, "p", 0.0)
    return base_path(x, self.weight, self.bias) + lora_path(F.dropout(x, p), self.lora_A, self.lora_B, self.scaling)


def apply_qlora(model, *args, **kwargs):
    model = reference_apply(model, *args, **kwargs)
    for module in model.modules():
        if hasattr(module, "lora_B"):
            module.forward = types.MethodType(_forward, module)
    return model
