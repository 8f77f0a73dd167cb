"""Mutant: apply_qlora passes on only the quantization options, so use_rslora is dropped silently (alpha / r, not
alpha / sqrt(r): scaling 1 instead of 4 at r = alpha = 16)."""

from lora_lab.model import DEFAULT_TARGETS
from lora_lab.model import apply_qlora as reference_apply
from lora_lab.train import training_step  # noqa: F401  (the step itself is right)

EXPECTED_FAILURE = "training.matches_peft_bitsandbytes"
QUANTIZATION = ("blocksize", "double_quant", "compute_dtype")


def apply_qlora(model, target_modules=DEFAULT_TARGETS, r=8, alpha=16, dropout=0.0, **quant_kwargs):
    kept = {name: value for name, value in quant_kwargs.items() if name in QUANTIZATION}
    return reference_apply(model, target_modules, r=r, alpha=alpha, dropout=dropout, **kept)
