"""Mutant: initialises lora_B randomly, like lora_A, so a fresh adapter already changes the model's output."""

import math

from torch import nn

from lora_lab.model import apply_qlora as reference_apply

EXPECTED_FAILURE = "qlora.apply_fresh_adapters_keep_base"


def apply_qlora(model, *args, **kwargs):
    model = reference_apply(model, *args, **kwargs)
    for module in model.modules():
        if hasattr(module, "lora_B"):
            nn.init.kaiming_uniform_(module.lora_B, a=math.sqrt(5))
    return model
