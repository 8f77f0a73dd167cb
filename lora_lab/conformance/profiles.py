"""Hypothesis profiles shared by pytest, ``lora-lab verify`` and ``lora-lab grade``.

- ``ci``: derandomized (the same examples on every run) and no deadline, as CI needs.
- ``dev``: random examples, twice as many of them, for local exploration.
- ``thorough``: ten times as many, for a release or a new implementation.

Each check asks for a number of examples sized for ``ci``; ``examples(n)``
scales it by the active profile, so one knob makes the whole suite deeper.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

settings.register_profile("ci", max_examples=100, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=200, **_COMMON)
settings.register_profile("thorough", max_examples=1000, **_COMMON)


def examples(n: int) -> int:
    """``n`` examples under the ``ci`` profile, scaled by the active profile's max_examples."""
    return max(1, n * settings.default.max_examples // 100)
