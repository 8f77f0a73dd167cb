"""Hypothesis profiles shared by pytest, ``lora-lab verify`` and ``lora-lab grade``.

- ``ci``: derandomized (the same examples on every run) and no deadline, as CI needs.
- ``dev``: random examples, twice as many of them, for local exploration.
- ``thorough``: ten times as many, for a release or a new implementation.

Each check asks for a number of examples sized for ``ci``; ``examples(n)``
scales it by the active profile, so one knob makes the whole suite deeper.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from hypothesis import HealthCheck, Phase, Verbosity, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

settings.register_profile("ci", max_examples=100, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=200, **_COMMON)
settings.register_profile("thorough", max_examples=1000, **_COMMON)
# What a course or a leaderboard scores with: ci's examples, drawn from a seed the target cannot know (see draw_seed).
settings.register_profile("scored", max_examples=100, derandomize=False, **_COMMON)
PROFILES = ("ci", "dev", "thorough", "scored")


def draw_seed() -> int:
    """A fresh seed for a scored run, from the operating system: no target can predict it, the report records it."""
    import secrets

    return secrets.randbits(32)


# Model-level draws are only seeds and hyperparameters: shrinking them teaches nothing and retrains models for minutes.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


def examples(n: int) -> int:
    """``n`` examples under the ``ci`` profile, scaled by the active profile's max_examples."""
    return max(1, n * settings.default.max_examples // 100)


@contextlib.contextmanager
def command_profile(name: str, seed: int | None = None) -> Iterator[None]:
    """Load profile ``name`` for ``lora-lab verify`` / ``grade``, and restore the previous one afterwards.

    Three changes to the profile: no example database (no .hypothesis/ folder among
    the user's files); no "explain" phase, which re-runs a failing example with
    variations to annotate a report the tables do not show (on a wrong answer it
    made a check take a minute instead of seconds); and quiet verbosity, so that
    hypothesis prints nothing of its own: under a random profile it would print
    "reproduce with @seed(...)" for every failing check, an untouched stub included,
    advice for a test file that a command's user does not have. The table row
    already says what failed and why.

    With ``seed``, every property draws from that seed (derandomization off), as
    pytest's ``--hypothesis-seed`` does: a scored run is reproducible by whoever
    knows the seed, and by no one else.
    """
    import hypothesis.core

    current = getattr(settings, "get_current_profile_name", None)  # public only in recent hypothesis versions
    previous = current() if current else settings._current_profile
    parent = settings.get_profile(name)
    command = f"lora-lab-{name}"
    phases = [phase for phase in parent.phases if phase != Phase.explain]
    seeded = {} if seed is None else {"derandomize": False}
    settings.register_profile(command, parent=parent, database=None, phases=phases, verbosity=Verbosity.quiet, **seeded)
    settings.load_profile(command)
    previous_seed = hypothesis.core.global_force_seed  # what hypothesis' own pytest plugin sets for --hypothesis-seed
    hypothesis.core.global_force_seed = seed
    try:
        yield
    finally:
        hypothesis.core.global_force_seed = previous_seed
        settings.load_profile(previous)
