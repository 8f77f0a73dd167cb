"""The conformance suite on the reference (lora_lab), the kernels and a real third party.

Every property lives once, in lora_lab/conformance; this file only chooses
targets. Each target is run on the checks for the operations it provides, and
what it provides is pinned below, so an operation cannot silently drop out.
"""

import pytest

from lora_lab.conformance.runner import OPERATIONS, PASSED, Target, all_checks, run_check

PROVIDES = {
    "lora_lab": set(OPERATIONS),
    "lora_lab.kernels": {"dequantize_nf4", "qlora_linear"},
    "lora_lab.targets.peft_bnb": {"quantize_nf4", "dequantize_nf4", "qlora_linear", "next_token_loss", "adamw_step"},
}
CASES = [(name, check) for name in PROVIDES for check in all_checks() if set(check.requires) <= PROVIDES[name]]


@pytest.mark.parametrize("target_name", sorted(PROVIDES))
def test_target_provides_what_it_should(target_name):
    target = Target.load(target_name)
    assert {op for op in OPERATIONS if target.provides(op)} == PROVIDES[target_name]


@pytest.mark.parametrize("target_name, check", CASES, ids=[f"{name}-{check.name}" for name, check in CASES])
def test_target_satisfies_property(target_name, check):
    result = run_check(check, Target.load(target_name))
    assert result.status == PASSED, f"{check.name} on {target_name}: {result.status}\n{result.detail}"
