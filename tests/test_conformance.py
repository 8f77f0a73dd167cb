"""The conformance suite on the reference (lora_lab), the kernels and a real third party.

Every property lives once, in lora_lab/conformance; this file only chooses targets.
A check that a target does not provide is skipped, never counted as passed.
"""

import pytest

from lora_lab.conformance.core import NOT_PROVIDED, PASSED, Target, all_checks, run_check

TARGETS = ("lora_lab", "lora_lab.kernels", "lora_lab.targets.peft_bnb")
CHECKS = all_checks()


@pytest.mark.parametrize("check", CHECKS, ids=[c.name for c in CHECKS])
@pytest.mark.parametrize("target_name", TARGETS)
def test_target_satisfies_property(target_name, check):
    target = Target.load(target_name)
    result = run_check(check, target)
    if result.status == NOT_PROVIDED:
        pytest.skip(f"{target_name} does not provide {', '.join(check.requires)}")
    assert result.status == PASSED, f"{check.name} on {target_name}: {result.status}\n{result.detail}"
