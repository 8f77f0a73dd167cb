"""Mutant: accepts compute_dtype and ignores it: every layer computes in fp32, right numbers, twice the activation memory."""

from lora_lab.model import apply_qlora as reference_apply_qlora
from lora_lab.train import training_step  # noqa: F401  (provided as is: the mistake is in apply_qlora)

EXPECTED_FAILURE = "qlora.apply_compute_dtype_matches_bitsandbytes"


def apply_qlora(model, compute_dtype=None, **kwargs):
    return reference_apply_qlora(model, **kwargs)
