"""The properties of the conformance suite: one module per topic, in the order of the exercises.

Each module registers its checks with ``lora_lab.conformance.registry.check``
when it is imported; ``all_checks`` imports them all and lists the checks in
exercise order (NF4 first, training last).
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
    realistic,
    step_at_scale,
    training,
)
from lora_lab.conformance.registry import CHECKS, Check


def all_checks() -> list[Check]:
    """Every registered check, in the order of the exercises that teach them (NF4 first, training last)."""
    return sorted(CHECKS, key=lambda c: (not c.exercise, c.exercise))  # checks no exercise teaches come last
