"""The conformance suite on the reference (lora_lab), the kernels and real third parties.

Every property lives once, in lora_lab/conformance; this file only chooses
targets. Each target is run on the checks for the operations it provides, and
what it provides is pinned below, so an operation cannot silently drop out.
A library's known failures are pinned too: each must still fail (with its
reason in the detail), so a fix upstream, or a suite that stopped seeing the
bug, shows up here.
"""

import pytest
from lora_lab.kernels.common import INTERPRETING

from lora_lab.conformance.runner import FAILED, OPERATIONS, PASSED, Target, all_checks, run_check

PROVIDES = {
    "lora_lab": set(OPERATIONS),
    "lora_lab.kernels": {"dequantize_nf4", "qlora_linear"},
    "lora_lab.targets.peft_bnb": {"quantize_nf4", "dequantize_nf4", "qlora_linear", "next_token_loss", "adamw_step"},
    "lora_lab.targets.hf_peft": {"apply_qlora", "training_step"},
}
# Bugs and gaps of the libraries as they are (the compatibility matrix in docs/compat/ has a reproduction of each).
KNOWN_FAILURES = {
    ("lora_lab.targets.hf_peft", "qlora.apply_rejects_unknown_target"):
        "peft's get_peft_model ignores a target module that matches nothing when another one matches",
    ("lora_lab.targets.hf_peft", "qlora.apply_dropout_only_in_training"):
        "bitsandbytes' Linear4bit in eval mode on the CPU repacks the weight and computes approximately",
    ("lora_lab.targets.peft_bnb", "qlora.rejects_bad_input"):
        "bitsandbytes 0.50's CPU kernel indexes NF4 blocks per row when K is not a multiple of the blocksize, so a "
        "Linear4bit with K = 48, blocksize 32 computes with the wrong absmax instead of refusing",
    ("lora_lab.targets.hf_peft", "memory.model_keeps_no_dense_weight"):
        "peft casts a bf16 input up to its fp32 adapters' dtype and autograd keeps that fp32 copy for backward",
}
# The slowest training checks (about a minute together) run on transformers + peft in the compatibility matrix
# (`lora-lab verify lora_lab.targets.hf_peft --json`), not in every test run.
MATRIX_ONLY = {("lora_lab.targets.hf_peft", name) for name in
               ("training.matches_reference", "training.lowers_loss", "training.matches_peft_bitsandbytes",
                "training.gradient_checkpointing")}
# Triton's interpreter (no GPU) runs a kernel element by element in numpy: the realistic sizes take 17 s (dequantizing
# 17 million elements) and over a minute (4096 x 4096 forward and backward). They run wherever the kernels are compiled.
if INTERPRETING:
    MATRIX_ONLY |= {("lora_lab.kernels", "nf4.dequantize_realistic_size"), ("lora_lab.kernels", "qlora.llama_shapes")}
CASES = [(name, check) for name in PROVIDES for check in all_checks()
         if set(check.requires) <= PROVIDES[name] and (name, check.name) not in MATRIX_ONLY]


@pytest.mark.parametrize("target_name", sorted(PROVIDES))
def test_target_provides_what_it_should(target_name):
    target = Target.load(target_name)
    assert {op for op in OPERATIONS if target.provides(op)} == PROVIDES[target_name]


@pytest.mark.parametrize("target_name, check", CASES, ids=[f"{name}-{check.name}" for name, check in CASES])
def test_target_satisfies_property(target_name, check):
    result = run_check(check, Target.load(target_name))
    if (target_name, check.name) in KNOWN_FAILURES:
        assert result.status == FAILED, (f"{check.name} on {target_name} was pinned as a known failure "
                                         f"({KNOWN_FAILURES[target_name, check.name]}) but it {result.status}")
        return
    assert result.status == PASSED, f"{check.name} on {target_name}: {result.status}\n{result.detail}"
