"""Mutant: apply_qlora does not pass alpha on, so every layer is scaled by the default 16 / r."""

from lora_lab.model import DEFAULT_TARGETS
from lora_lab.model import apply_qlora as reference_apply
from lora_lab.train import training_step  # noqa: F401  (the step itself is right)

EXPECTED_FAILURE = "training.matches_peft_bitsandbytes"


def apply_qlora(model, target_modules=DEFAULT_TARGETS, r=8, alpha=16, dropout=0.0, **quant_kwargs):
    return reference_apply(model, target_modules, r=r, dropout=dropout, **quant_kwargs)
