"""Mutant: apply_qlora quantizes only the targeted layers, leaving the MLP's gate/up/down_proj dense (frozen, but in fp32)."""

from lora_lab.model import DEFAULT_TARGETS
from lora_lab.model import apply_qlora as reference_apply

EXPECTED_FAILURE = "qlora.apply_quantizes_whole_base"


def apply_qlora(model, target_modules=DEFAULT_TARGETS, r=8, alpha=16, dropout=0.0, **quant_kwargs):
    return reference_apply(model, target_modules, r, alpha, dropout, quantize_base=False, **quant_kwargs)
