"""Targets and the runner: what pytest, ``verify`` and ``grade`` share.

A *target* is anything importable that provides some of the operations in
``OPERATIONS``. ``run_check`` runs one check on one target and returns a
``Result``; it never raises, so one broken operation cannot hide the results of
the others.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lora_lab.conformance.errors import (
    CheckFailed,
    NotSupported,
    RemoteError,
    StubReached,
    TargetCrashed,
    TargetTimedOut,
    raised_by_a_library,
    user_traceback,
)
from lora_lab.conformance.isolation.target import Target
from lora_lab.conformance.registry import (
    ERROR,
    FAILED,
    NOT_ATTEMPTED,
    NOT_PROVIDED,
    NOT_SUPPORTED,
    OPERATIONS,
    PASSED,
    Check,
    over_budget,
)

try:
    BaseExceptionGroup  # noqa: B018
except NameError:  # Python 3.10: hypothesis depends on the backport
    from exceptiongroup import BaseExceptionGroup



def all_checks() -> list[Check]:
    """Every check of the suite, in exercise order (importing the properties registers them)."""
    from lora_lab.conformance.properties import all_checks as registered

    return registered()


__all__ = [
    "ERROR", "FAILED", "NOT_ATTEMPTED", "NOT_PROVIDED", "NOT_SUPPORTED", "OPERATIONS", "PASSED",
    "Check", "CheckFailed", "Result", "Target", "all_checks", "load_target", "run_check", "run_suite",
]


def load_target(spec: str, isolated: bool = True):
    """The target named ``spec``: in its own process (the default, for any target) or, for trusted code, in this one."""
    if not isolated:
        return Target.load(spec)
    from lora_lab.conformance.isolation.proxy import RemoteTarget

    return RemoteTarget(spec)


@dataclass
class Result:
    check: Check
    status: str
    detail: str = ""
    target_seconds: float = 0.0  # time inside the target's own calls (isolated targets only)
    sampled_seconds: float = 0.0  # the target's time on the calls also timed with lora_lab's reference
    reference_seconds: float = 0.0  # the reference's time on those same calls
    interpreted_calls: int = 0  # calls that ran Triton's interpreter, not timed against the reference

    @property
    def slowdown(self) -> float | None:
        """The target's time over the reference's on the same calls (None when none was timed)."""
        return self.sampled_seconds / self.reference_seconds if self.reference_seconds > 0 else None
    seconds: float = 0.0  # wall time of the whole check, set by the command that ran it

    @property
    def ok(self) -> bool:
        return self.status in (PASSED, NOT_PROVIDED, NOT_SUPPORTED)

    @property
    def points(self) -> int:
        return self.check.points if self.status == PASSED else 0


def _leaf_exceptions(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaf_exceptions(inner)]
    return [exc]


def run_check(check: Check, target: Target) -> Result:
    """Run one check on one target; never raises. After an error an isolated target gets a fresh process."""
    try:
        missing = [op for op in check.requires if not target.provides(op)]
    except ValueError as exc:  # an isolated target whose restarted process no longer imports it
        return Result(check, ERROR, f"the target's process could not be restarted: {exc}")
    if missing:
        return Result(check, NOT_PROVIDED, f"target has no {', '.join(missing)}")
    from lora_lab.conformance.judge import contract  # imports torch: not at import time, so `lora-lab verify -h` stays fast

    contract.WATCH.clear()  # outputs of an earlier check are not this check's to judge
    target.seconds, target.sampled, target.timing, target.interpreted = 0.0, {}, [0.0, 0.0], 0
    target.timed = check.timed
    result = _run(check, target)
    result.target_seconds = target.seconds
    result.sampled_seconds, result.reference_seconds = target.timing
    result.interpreted_calls = target.interpreted
    over = over_budget(result.sampled_seconds, result.reference_seconds) if check.timed else None
    if result.status == PASSED and over:
        result = replace(result, status=FAILED, detail=f"{over}; the values were right")
    if result.status == ERROR:
        target.reset()  # an isolated target gets a fresh process (its import is awaited by the next check)
    return result


def _run(check: Check, target: Target) -> Result:
    try:
        note = check.func(target)  # a check may return a note for the report (what each bad input did, say)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a Result
        if isinstance(exc, KeyboardInterrupt):
            raise
        leaves = _leaf_exceptions(exc)
        if any(isinstance(e, StubReached) or isinstance(e, NotImplementedError) and not raised_by_a_library(e)
               for e in leaves):
            return Result(check, NOT_ATTEMPTED, "raises NotImplementedError (still a stub)")
        unsupported = [e for e in leaves if isinstance(e, NotSupported)]
        if unsupported:
            return Result(check, NOT_SUPPORTED, f"not supported: {unsupported[0]}")
        first = leaves[0]
        if isinstance(first, (TargetCrashed, TargetTimedOut)):
            return Result(check, ERROR, str(first))
        if isinstance(first, CheckFailed):
            return Result(check, FAILED, _strip_hypothesis_noise(str(first)))
        # Anything else, a library's own assert included, is an error in the target: its traceback, and the input.
        drawn = _drawn_input(first)
        where = f"on the drawn input {drawn}\n" if drawn else ""
        if isinstance(first, RemoteError):
            return Result(check, ERROR, where + (first.info.get("traceback") or f"{type(first).__name__}: {first}"))
        return Result(check, ERROR, where + user_traceback(first))
    return Result(check, PASSED, _self_comparison(check, target) or (note if isinstance(note, str) else ""))


def _self_comparison(check: Check, target: Target) -> str:
    """The target's own word that this check's oracle is the very library it wraps: a pass shows determinism only."""
    declared = target.declaration("SELF_COMPARISONS")
    reason = declared.get(check.name) if isinstance(declared, dict) else None
    return f"self-comparison: the oracle is the library itself ({reason}); this pass shows determinism only" if reason else ""


def _drawn_input(exc: BaseException, limit: int = 600) -> str:
    """Hypothesis' note of the failing example on one line (tensors are summarized by torch), or ""."""
    for note in getattr(exc, "__notes__", ()):
        if note.startswith(("Falsifying", "Failing")):  # "Falsifying example: ...", "Failing explicit example: ..."
            text = " ".join(note.partition(":")[2].split())
            return text if len(text) <= limit else text[: limit - 3] + "..."
    return ""


def _strip_hypothesis_noise(message: str) -> str:
    return "\n".join(line for line in message.splitlines() if line.strip()).strip()


def run_suite(target: Target | str, only: list[str] | None = None) -> list[Result]:
    """Run every check (or those whose name starts with one of ``only``) on ``target`` (a name runs isolated)."""
    if isinstance(target, str):
        target = load_target(target)
    checks = [c for c in all_checks() if not only or any(c.name.startswith(o) for o in only)]
    return [run_check(c, target) for c in checks]
