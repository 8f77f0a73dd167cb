"""The registry of checks: what a check is, and the list the properties add themselves to.

A *check* is one named property of a QLoRA implementation, with points and a
hint for learners. The property modules (``lora_lab.conformance.properties``)
register theirs with ``@check``; this module imports none of them, so the
machinery and the properties never import each other in a circle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

OPERATIONS = (
    "quantize_nf4",
    "dequantize_nf4",
    "qlora_linear",
    "next_token_loss",
    "adamw_step",
    "apply_qlora",
    "training_step",
    "NF4_FORMAT",  # not a function: a library's own weight format (lora_lab.conformance.judge.formats)
)

PASSED, FAILED, ERROR, NOT_PROVIDED, NOT_ATTEMPTED = "passed", "failed", "error", "not provided", "not attempted"
NOT_SUPPORTED = "not supported"  # the target declares (or was probed to have) no support for what the check needs

# Two levels of conformance. Semantic: NF4 as defined, and the layer against float64 of the target's own
# dequantized weight, whatever its storage. Interchange: byte-identical with bitsandbytes' storage.
SEMANTIC, INTERCHANGE = "semantic", "interchange"
LEVEL_PREFIX = {  # what a hint says first, so that a failure names its level
    "": "",
    SEMANTIC: "Semantic level (the numbers themselves, in any storage format): ",
    INTERCHANGE: "Interchange level (bitsandbytes' bytes and stack; the numbers alone may still be right): ",
}


@dataclass(frozen=True)
class Check:
    name: str  # e.g. "nf4.bytes_match_bitsandbytes"
    requires: tuple[str, ...]  # operations the target must provide
    points: int  # weight in `lora-lab grade`
    description: str  # one line: the property
    hint: str  # for learners: how to think about a failure, never the solution
    exercise: str  # the exercise that teaches it ("01" ... "08"), or "" for one no exercise teaches (not graded)
    func: Callable[[Any], None] = field(repr=False, compare=False)
    level: str = ""  # SEMANTIC or INTERCHANGE for the NF4 and layer checks: which conformance a failure is a failure of
    timed: bool = False  # held to TIME_BUDGET (below): the realistic-size checks, where fixed per-call costs are small
    # its oracle runs in a process of its own (isolation.stack), started early, which imports these modules first
    stack: tuple[str, ...] = ()


CHECKS: list[Check] = []

# A correct answer far slower than lora_lab's reference is rejected by the realistic-size checks (``Check.timed``):
# ratio x the reference's time on the same calls, plus a floor per check for fixed costs (a first call's warm-up).
# At the suite's small sizes fixed per-call costs dominate (peft + bitsandbytes builds a layer per call, 1000x the
# reference's time there), so those checks only report the ratio; calls that ran Triton's interpreter are not timed.
TIME_BUDGET = (50.0, 0.5)


def over_budget(target_seconds: float, reference_seconds: float) -> str | None:
    """Why the target's time on the calls timed beside lora_lab's reference exceeds ``TIME_BUDGET``, or None."""
    ratio, floor = TIME_BUDGET
    if reference_seconds <= 0 or target_seconds <= ratio * reference_seconds + floor:
        return None
    return (f"over the time budget: on the calls also timed with lora_lab's reference the target took "
            f"{target_seconds:.2f} s where the reference took {reference_seconds:.3f} s "
            f"({target_seconds / reference_seconds:.0f}x; the budget is {ratio:.0f}x the reference's time plus {floor} s "
            "a check)")


def check(name: str, *, requires: tuple[str, ...], points: int, exercise: str, hint: str, level: str = "",
          timed: bool = False, stack: tuple[str, ...] = ()):
    """Register a property. Its docstring's first line becomes the description."""

    def register(func: Callable[[Any], None]) -> Callable[[Any], None]:
        if any(c.name == name for c in CHECKS):
            raise ValueError(f"a check named {name!r} is already registered")
        unknown = set(requires) - set(OPERATIONS)
        if unknown:
            raise ValueError(f"check {name!r} requires unknown operations {sorted(unknown)}")
        if level not in LEVEL_PREFIX:
            raise ValueError(f"check {name!r} has level {level!r}; expected one of {sorted(LEVEL_PREFIX)}")
        description = (func.__doc__ or name).strip().splitlines()[0]
        CHECKS.append(Check(name, tuple(requires), points, description, LEVEL_PREFIX[level] + hint, exercise, func, level,
                            timed, tuple(stack)))
        return func

    return register
