"""Hypothesis profiles shared by pytest, ``lora-lab verify`` and ``lora-lab grade``.

- ``ci``: derandomized (the same examples on every run) and no deadline, as CI needs.
- ``dev``: random examples, twice as many of them, for local exploration.
- ``thorough``: ten times as many, for a release or a new implementation.

Each check asks for a number of examples sized for ``ci``; ``examples(n)``
scales it by the active profile, so one knob makes the whole suite deeper.

``command_profile`` also runs the checks on one torch thread (``$LORA_LAB_THREADS``
asks for more), as ``lora-lab demo``, ``train`` and ``bench`` do: the drawn
problems are small, and on a busy 2-core machine torch's default of one thread
per core made every tiny op wait for a descheduled thread that spins. Exercise
06 took 66 CPU s and 85 s with two threads beside one busy core, against 12 CPU s
and 24 s with one, and the whole grade 100 s against 19 s beside another test
run. On an idle machine the wall time is the same, but for exercise 01's
17-million-element weight, which quantizes about 0.7 s slower on one thread.
"""

from __future__ import annotations

import contextlib
import functools
import os
import zlib
from collections.abc import Iterator

from hypothesis import HealthCheck, Phase, Verbosity, settings

from lora_lab import THREADS_ENV  # the same variable as lora-lab demo's and train's --threads default

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


def run_seed(case: str) -> int:
    """The seed of one fixed-size ``case`` (a realistic-size weight, say) of this run, drawn without hypothesis.

    Hypothesis' first example is always the simplest one, so a check that draws one expensive case through it would
    get the same case under every seed. These cases come from the run's own seed instead: a scored run's (or
    ``--seed``'s, or pytest's ``--hypothesis-seed``), fixed under a derandomized profile such as ``ci``, fresh under
    ``dev`` and ``thorough`` (once per process). ``case`` keeps the cases of one run apart, and shared where checks
    name the same one.
    """
    import hypothesis.core

    forced = hypothesis.core.global_force_seed
    if forced is None:
        forced = 0 if settings.default.derandomize else _session_seed()
    return zlib.crc32(f"{forced}:{case}".encode())


@functools.cache
def _session_seed() -> int:
    """One fresh seed per process for the random profiles, so that checks naming the same case share it."""
    return draw_seed()


# Model-level draws are only seeds and hyperparameters: shrinking them teaches nothing and retrains models for minutes.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


def examples(n: int) -> int:
    """``n`` examples under the ``ci`` profile, scaled by the active profile's max_examples."""
    return max(1, n * settings.default.max_examples // 100)




def command_threads() -> int:
    """The torch threads ``lora-lab grade`` and ``verify`` check on: ``$LORA_LAB_THREADS``, else 1; 0 is torch's default."""
    text = os.environ.get(THREADS_ENV, "1")
    try:
        threads = int(text)
    except ValueError:
        threads = -1
    if threads < 0:
        raise ValueError(f"${THREADS_ENV}={text!r}: expected a whole number of threads >= 0 (0: torch's default of one "
                         "per core)")
    return threads


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

    torch runs on ``command_threads()`` threads inside the block, and on as many as
    before after it (the contract's global-state check compares each call's
    before and after, so a target still may not change the count).
    """
    import hypothesis.core
    import torch

    threads = command_threads()  # first: a bad $LORA_LAB_THREADS fails before anything is changed
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
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        hypothesis.core.global_force_seed = previous_seed
        settings.load_profile(previous)
