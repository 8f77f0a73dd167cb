"""Mutant: apply_qlora drops the backend option silently: backend='triton' runs the reference, and an unknown backend
is never refused."""

from lora_lab.model import DEFAULT_TARGETS
from lora_lab.model import apply_qlora as reference_apply
from lora_lab.train import training_step  # noqa: F401  (the step itself is right)

EXPECTED_FAILURE = "qlora.apply_rejects_unknown_target"


def apply_qlora(model, target_modules=DEFAULT_TARGETS, r=8, alpha=16, dropout=0.0, **quant_kwargs):
    quant_kwargs.pop("backend", None)
    return reference_apply(model, target_modules, r=r, alpha=alpha, dropout=dropout, **quant_kwargs)
