"""Mutant: apply_qlora that keeps each base weight's dense fp32 copy on the layer "to speed up forward" (8.7x NF4)."""

from lora_lab.model import apply_qlora as _reference
from lora_lab.nf4 import dequantize_nf4

EXPECTED_FAILURE = "qlora.apply_holds_only_nf4"


def apply_qlora(model, *args, **kwargs):
    model = _reference(model, *args, **kwargs)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(weight, "packed"):
            module._dense_cache = dequantize_nf4(weight).float()
    return model
