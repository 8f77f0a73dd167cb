"""Mutant: apply_qlora silently skips target names that match no layer, so a typo trains fewer layers than asked."""

from lora_lab.model import DEFAULT_TARGETS, linear_names
from lora_lab.model import apply_qlora as reference_apply

EXPECTED_FAILURE = "qlora.apply_rejects_unknown_target"


def apply_qlora(model, target_modules=DEFAULT_TARGETS, **kwargs):
    existing = set(linear_names(model))
    return reference_apply(model, tuple(t for t in target_modules if t in existing), **kwargs)
