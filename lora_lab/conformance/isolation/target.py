"""A target in this process: the object the properties call, found by name.

In the suite's process this is only for trusted code (``load_target(spec, isolated=False)``); every other target is
reached through ``proxy.RemoteTarget``, which has the same methods. In the target's own process (``child.py``) it is
how the child finds the operations of the module it was asked to import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lora_lab.conformance.registry import OPERATIONS


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
        from lora_lab.conformance.judge.memory import measure

        with measure(lambda n: n >= min_numel) as record:
            result = self.op(operation)(*args)
        return result, record.saved, record.alive()

    def model(self, seed: int, **kwargs):
        """``tiny_llama(seed)`` through the target's ``apply_qlora``, as a ``ModelHandle`` (what the properties see)."""
        from lora_lab.conformance.judge.model_protocol import ModelHandle

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
        from lora_lab.conformance.isolation.origin import origin_of

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

