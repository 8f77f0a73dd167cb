"""The learning-rate schedule of ``lora-lab train``, and what ``--resume --steps N`` does to it.

A run's schedule is a list of segments. The first is the one planned at the
start: linear warmup, then cosine or linear decay to 0 at the last step, or
constant. Resuming with the same ``--steps`` keeps it, so a stopped and resumed
run is bit-identical with one that never stopped. Resuming with another
``--steps`` adds a segment: the rate goes on from the one the run had reached
and decays (or stays constant) over the steps to the new end. The rate never
jumps back up: a finished cosine run has decayed to about 0, so extending it
changes the adapter little. For a full schedule over more steps, start a new run
with the larger ``--steps``.
"""

from __future__ import annotations

import math


def lr_multiplier(step: int, total: int, warmup: int, kind: str) -> float:
    """Learning rate of update ``step`` (from 0) as a share of the peak: linear warmup, then cosine/linear decay or constant."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1 - progress if kind == "linear" else 1.0


def plan(total: int, warmup_ratio: float) -> list[dict]:
    """The schedule planned at the start of a run of ``total`` steps."""
    return [{"start": 0, "end": total, "warmup": math.ceil(warmup_ratio * total), "rate": 1.0}]


def multiplier(step: int, segments: list[dict], kind: str) -> float:
    """The rate of update ``step`` as a share of the peak, from the last segment that has begun by then."""
    segment = next(s for s in reversed(segments) if step >= s["start"])
    return segment["rate"] * lr_multiplier(step - segment["start"], segment["end"] - segment["start"], segment["warmup"], kind)


def resumed(segments: list[dict], done: int, total: int, kind: str) -> list[dict]:
    """The schedule of a run resumed after ``done`` steps with ``total`` as its new end (unchanged if the end is the same)."""
    end = segments[-1]["end"]
    if total == end:
        return segments
    rate = multiplier(min(done, end - 1), segments, kind)  # the rate of the next planned step, or of the last one done
    return [*segments, {"start": done, "end": total, "warmup": 0, "rate": rate}]
