"""Targets and the runner: what pytest, ``verify`` and ``grade`` share.

A *target* is anything importable that provides some of the operations in
``OPERATIONS``. ``run_check`` runs one check on one target and returns a
``Result``; it never raises, so one broken operation cannot hide the results of
the others.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from lora_lab.conformance.capabilities import NotSupported
from lora_lab.conformance.registry import (
    ERROR,
    FAILED,
    NOT_ATTEMPTED,
    NOT_PROVIDED,
    NOT_SUPPORTED,
    OPERATIONS,
    PASSED,
    Check,
    CheckFailed,
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


@dataclass
class Target:
    """An implementation under test: a module, or ``module:attribute``, or any object."""

    name: str
    obj: Any
    probed: Any = None  # what formats.capabilities found the target's format supports, once probed

    @classmethod
    def load(cls, spec: str | Any) -> Target:
        if not isinstance(spec, str):
            return cls(getattr(spec, "__name__", type(spec).__name__), spec)
        module_name, _, attribute = spec.partition(":")
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise ValueError(
                f"cannot import {module_name!r} ({exc}); expected an importable module, "
                "such as 'my_package.qlora' or 'my_package.qlora:impl'"
            ) from exc
        for part in filter(None, attribute.split(".")):
            if not hasattr(obj, part):
                raise ValueError(f"{module_name!r} has no attribute {part!r} (from target {spec!r})")
            obj = getattr(obj, part)
        return cls(spec, obj)

    def provides(self, operation: str) -> bool:
        try:
            if operation == "NF4_FORMAT":  # an object, not a function
                return getattr(self.obj, operation, None) is not None
            return callable(getattr(self.obj, operation, None))
        except ImportError:  # a lazily exported name whose module is missing
            return False

    def op(self, operation: str, watch_memory: bool = False) -> Callable:
        """The operation itself (in this process the bounds properties guard and watch it themselves)."""
        return getattr(self.obj, operation)

    def measured(self, operation: str, min_numel: int, *args):
        """``op(*args)`` with what it keeps for backward measured (``memory.measure``): ``(result, saved, alive)``,
        the saved and still-alive tensors of ``min_numel`` elements or more."""
        from lora_lab.conformance.memory import measure

        with measure(lambda n: n >= min_numel) as record:
            result = self.op(operation)(*args)
        return result, record.saved, record.alive()

    def model(self, seed: int, **kwargs):
        """``tiny_llama(seed)`` through the target's ``apply_qlora``, as a ``ModelHandle`` (what the properties see)."""
        from lora_lab.conformance.model_protocol import ModelHandle

        return ModelHandle.build(self, seed, **kwargs)

    def declaration(self, name: str) -> Any:
        """A plain-data declaration of the target's module (``CAPABILITIES``, ``SELF_COMPARISONS``, ``LIBRARIES``)."""
        return getattr(self.obj, name, None)

    def nf4_format(self) -> Any:
        """The target's own ``NF4_FORMAT`` (``formats.py``), or None."""
        return getattr(self.obj, "NF4_FORMAT", None)

    @property
    def origin(self) -> dict[str, dict]:
        """For each operation provided: its module and file, and whether it is lora_lab's own code (``origin.py``)."""
        from lora_lab.conformance.origin import origin_of

        return {op: origin_of(getattr(self.obj, op)) for op in OPERATIONS if self.provides(op)}

    seconds = 0.0  # time inside the target's calls: measured only for an isolated target
    sampled = None  # per check, set by run_check: calls timed against the reference (isolated targets only)
    timing = (0.0, 0.0)
    interpreted = 0
    timed = False

    def reset(self) -> None:
        """Nothing to restart in this process (an isolated target starts a fresh one)."""

    def close(self) -> None:
        """Nothing to stop in this process."""


def load_target(spec: str, isolated: bool = True):
    """The target named ``spec``: in its own process (the default, for any target) or, for trusted code, in this one."""
    if not isolated:
        return Target.load(spec)
    from lora_lab.conformance.isolation import RemoteTarget

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


def _user_traceback(exc: BaseException) -> str:
    """The traceback lines that are not lora_lab's or hypothesis' own: the implementation's."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "/lora_lab/conformance/" not in f.filename and "/hypothesis/" not in f.filename
    ]
    lines = traceback.format_list(frames[-4:])
    return "".join(lines) + f"{type(exc).__name__}: {exc}"


def run_check(check: Check, target: Target) -> Result:
    """Run one check on one target; never raises. After an error an isolated target gets a fresh process."""
    try:
        missing = [op for op in check.requires if not target.provides(op)]
    except ValueError as exc:  # an isolated target whose restarted process no longer imports it
        return Result(check, ERROR, f"the target's process could not be restarted: {exc}")
    if missing:
        return Result(check, NOT_PROVIDED, f"target has no {', '.join(missing)}")
    from lora_lab.conformance import contract  # imports torch: not at import time, so `lora-lab verify -h` stays fast

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
    from lora_lab.conformance.child_process import RemoteError, TargetCrashed, TargetTimedOut
    from lora_lab.conformance.learner import StubReached

    try:
        note = check.func(target)  # a check may return a note for the report (what each bad input did, say)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a Result
        if isinstance(exc, KeyboardInterrupt):
            raise
        leaves = _leaf_exceptions(exc)
        if any(isinstance(e, StubReached) or isinstance(e, NotImplementedError) and not _raised_by_a_library(e)
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
        return Result(check, ERROR, where + _user_traceback(first))
    return Result(check, PASSED, _self_comparison(check, target) or (note if isinstance(note, str) else ""))


def _self_comparison(check: Check, target: Target) -> str:
    """The target's own word that this check's oracle is the very library it wraps: a pass shows determinism only."""
    declared = target.declaration("SELF_COMPARISONS")
    reason = declared.get(check.name) if isinstance(declared, dict) else None
    return f"self-comparison: the oracle is the library itself ({reason}); this pass shows determinism only" if reason else ""


def _raised_by_a_library(exc: BaseException) -> bool:
    """True when the innermost frame is an installed package's (torch or torchao lacking an op): an error, not a stub."""
    if isinstance(getattr(exc, "info", None), dict):  # raised in the target's process, which looked at its frames
        return bool(exc.info.get("library"))
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and any(folder in frames[-1].filename for folder in ("site-packages", "dist-packages"))


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
