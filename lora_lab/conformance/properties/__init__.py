"""The properties of the conformance suite: one module per topic, in the order of the exercises.

Each module registers its checks with ``lora_lab.conformance.registry.check``
when it is imported; ``all_checks`` imports them all and lists the checks in
exercise order (NF4 first, training last), and within an exercise in the order
of ``TOPICS``: what the op computes first, then how it compares with the real
stack, what it refuses, what it keeps in memory, and its realistic-size case.
A check whose oracle runs in a process of its own (``Check.stack``: peft,
bitsandbytes or transformers, ``isolation.stack``) comes last in its exercise: that
process imports them while the others run.
"""

from __future__ import annotations

from lora_lab.conformance.properties import (  # noqa: F401  (importing registers them)
    adamw,
    apply_qlora,
    bounds,
    convergence,
    double_quant,
    loss,
    memory,
    nf4,
    nf4_semantic,
    qlora,
    qlora_interchange,
    qlora_validation,
    realistic,
    step_at_scale,
    training,
)
from lora_lab.conformance.registry import CHECKS, Check

TOPICS = (
    "nf4", "nf4_semantic", "double_quant", "qlora", "qlora_interchange", "qlora_validation", "loss", "adamw",
    "apply_qlora", "training", "convergence", "memory", "realistic", "step_at_scale", "bounds",
)


def _topic(check: Check) -> int:
    module = check.func.__module__.rpartition(".")[2]
    if module not in TOPICS:
        raise ValueError(f"properties/{module}.py is not in properties.TOPICS: add it where its checks belong")
    return TOPICS.index(module)


def all_checks() -> list[Check]:
    """Every registered check, in the order of the exercises that teach them (NF4 first, training last)."""
    order = {id(c): i for i, c in enumerate(CHECKS)}
    # checks no exercise teaches come last; within an exercise, by topic, then as each module lists them
    return sorted(CHECKS, key=lambda c: (not c.exercise, c.exercise, bool(c.stack), _topic(c), order[id(c)]))
