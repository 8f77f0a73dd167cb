"""The contract beyond values: what a call may leave behind, and what its outputs must look like.

Matching the oracle is not enough for a verdict to be trusted. Benchmark
verifiers (KernelBench, the gpu-mode leaderboards) learned that a candidate can
be right at the moment of comparison and wrong everywhere else. So every call
the suite makes (``compare.call_guarded``) is held to this contract too:

- **Global state.** A call leaves the process as it found it: torch's, Python's
  and numpy's random state, the default dtype, grad and inference mode, the
  number of threads, the deterministic-algorithms flags. Reseeding the RNG or
  ``torch.set_num_threads(1)`` changes every later computation, the caller's included.
- **Inputs.** Never written, not even as scratch space restored before returning:
  torch's version counter counts every in-place write, so a restored input is
  still caught.
- **Outputs.** Owned by the caller: copied the moment they are returned, and
  checked against that copy again after every later call. An output that shares
  storage with an earlier output or with an input, or that a background thread
  writes to after the return (a "lazy" output), differs from its copy.
- **Layout.** Row-major and contiguous, as torch's own ops return them.
- **Determinism**, stated per op in ``DETERMINISTIC``: the same inputs twice give
  the same bits.

The copies are what the properties compare with the oracle, so an output is
judged by what it held when it was handed over.
"""

from __future__ import annotations

import copy
import random
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lora_lab.conformance.errors import CheckFailed

# The determinism each operation promises: the same inputs (same values, fresh storage) twice give these results.
DETERMINISTIC = {
    "quantize_nf4": "bit-identical (integer codes and statistics)",
    "dequantize_nf4": "bit-identical (one lookup and one product per element)",
    "qlora_linear": "bit-identical forward on the same device (no atomics, no split-K race in the output)",
    "next_token_loss": "bit-identical",
    "adamw_step": "bit-identical (elementwise)",
}


def global_state() -> dict[str, Any]:
    """Everything process-wide that an op could change behind its caller's back."""
    state = {
        "torch random state": torch.random.get_rng_state(),
        "Python random state": random.getstate(),
        "default dtype": torch.get_default_dtype(),
        "grad mode": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(),
        "number of threads": torch.get_num_threads(),
        "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic algorithms warn-only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "anomaly detection": torch.is_anomaly_enabled(),
    }
    try:
        import numpy
    except ImportError:  # numpy is optional for torch
        numpy = None
    if numpy is not None:
        _, keys, position, has_gauss, gauss = numpy.random.get_state()
        state["numpy random state"] = (keys.tobytes(), position, has_gauss, gauss)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["CUDA random state"] = torch.cuda.get_rng_state_all()
    return state


_PLAIN = (int, float, str, bytes, bool, type(None))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if type(a) in (list, tuple) and all(type(x) in _PLAIN for x in a):  # Python's random state: 625 ints at once
        return a == b
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def state_changes(before: dict[str, Any], after: dict[str, Any], random_state: bool = True) -> list[str]:
    """The names of the global settings that differ, each with its old and new value (random states by name only)."""
    changes = []
    for key, old in before.items():
        if not random_state and "random" in key:
            continue
        new = after.get(key)
        if not _same(old, new):
            changes.append(key if "random" in key else f"{key} ({old!r} -> {new!r})")
    return changes


@contextmanager
def keeps_global_state(name: str, random_state: bool = True) -> Iterator[None]:
    """Fail if the code inside changes global state; ``random_state=False`` for ops that may draw (dropout, init)."""
    before = global_state()
    yield
    changed = state_changes(before, global_state(), random_state)
    if changed:
        raise CheckFailed(f"{name} changed global state: {', '.join(changed)}; an operation must leave the process "
                          "as it found it (save and restore what you change, or use a local torch.Generator)")


def _is_subclass(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and type(value) not in (torch.Tensor, torch.nn.Parameter) and hasattr(
        value, "__tensor_flatten__")


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors of a result: itself, inside lists/tuples/dicts, or the tensor fields of an object (an NF4Tensor).

    A tensor subclass (torchao's NF4Tensor) is the tensors it is made of (``__tensor_flatten__``).
    """
    if _is_subclass(value):
        return [t for name in value.__tensor_flatten__()[0] for t in tensors_in(getattr(value, name))]
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    fields = getattr(value, "__dict__", None)
    if isinstance(fields, dict):
        return [v for v in fields.values() if isinstance(v, torch.Tensor)]
    return []


def owned_copy(value: Any) -> Any:
    """A copy that shares no storage with ``value``: tensors cloned, an object's tensor fields cloned.

    A tensor subclass is rebuilt from copies of its inner tensors: its own clone() may do anything (torchao's
    NF4Tensor re-quantizes with its default block sizes).
    """
    if _is_subclass(value):
        names, context = value.__tensor_flatten__()
        inner = {name: owned_copy(getattr(value, name)) for name in names}
        return type(value).__tensor_unflatten__(inner, context, value.shape, value.stride())
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(owned_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: owned_copy(v) for k, v in value.items()}
    fields = getattr(value, "__dict__", None)
    if not isinstance(fields, dict) or not any(isinstance(v, torch.Tensor) for v in fields.values()):
        return value
    duplicate = copy.copy(value)
    for key, field in fields.items():
        if isinstance(field, torch.Tensor):
            object.__setattr__(duplicate, key, field.detach().clone())  # frozen dataclasses too
    return duplicate


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.numel() else 0


class OutputWatch:
    """The last outputs the suite received, each beside the copy taken at its return; re-checked on every call."""

    def __init__(self, keep: int = 8) -> None:
        self._entries: deque[tuple[str, torch.Tensor, torch.Tensor]] = deque(maxlen=keep)

    def record(self, live: Any, copied: Any, what: str) -> None:
        for index, (t, c) in enumerate(zip(tensors_in(live), tensors_in(copied))):
            self._entries.append((f"{what} (output tensor #{index})", t, c))

    def verify(self, after: str) -> None:
        for what, live, copied in self._entries:
            if not torch.equal(live.detach(), copied) and not _both_nan_equal(live.detach(), copied):
                self._entries.clear()
                raise CheckFailed(f"{what} changed after it was returned, by {after}; an output belongs to the caller: "
                                  "no storage shared with a later output or an input, no write after returning")

    def clear(self) -> None:
        self._entries.clear()


def _both_nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.is_floating_point() and a.shape == b.shape and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


WATCH = OutputWatch()


def check_layout(value: Any, name: str) -> None:
    """Every output tensor is contiguous and row-major, as torch's own ops return them."""
    for t in tensors_in(value):
        if not t.is_contiguous():
            raise CheckFailed(f"{name} returned a non-contiguous tensor (shape {tuple(t.shape)}, strides {t.stride()}); "
                              "expected a contiguous, row-major result (call .contiguous() on a transposed result)")


def check_no_input_alias(value: Any, inputs: Any, name: str) -> None:
    """No output shares storage with an input: the caller may overwrite its inputs and keep its results."""
    held = {_storage(t) for t in tensors_in(inputs)} - {0}
    for t in tensors_in(value):
        if _storage(t) in held:
            raise CheckFailed(f"{name} returned a tensor (shape {tuple(t.shape)}) that shares storage with one of its "
                              "inputs; expected a new tensor")


def input_versions(inputs: Any) -> list[int]:
    return [t._version for t in tensors_in(inputs)]


def check_inputs_not_written(before: list[int], inputs: Any, name: str) -> None:
    """Torch's version counter counts every in-place write: an input used as scratch and restored is caught too."""
    for position, (old, t) in enumerate(zip(before, tensors_in(inputs))):
        if t._version != old:
            raise CheckFailed(f"{name} wrote in place to input tensor #{position} (shape {tuple(t.shape)}), even if it "
                              "restored it afterwards; inputs are read-only: work on a copy")


def check_deterministic(fn: Callable, args: tuple, kwargs: dict, first: Any, name: str) -> None:
    """Call again on fresh copies of the same inputs: the answer must be the same bits."""
    second = fn(*owned_copy(args), **owned_copy(kwargs))
    for index, (a, b) in enumerate(zip(tensors_in(first), tensors_in(second))):
        if a.shape != b.shape or not (torch.equal(a.detach(), b.detach()) or _both_nan_equal(a.detach(), b.detach())):
            raise CheckFailed(f"{name} is not deterministic: the same inputs a second time gave a different output tensor "
                              f"#{index}; {name} promises {DETERMINISTIC.get(name, 'the same answer')}")
    WATCH.record(second, owned_copy(second), f"the repeated {name}")


def refill_tail(tensors: list[torch.Tensor], generator: torch.Generator) -> None:
    """New values in the second half of each tensor, in place: the same storage and the same prefix, a new answer.

    A cache keyed by ``data_ptr()`` or by the first values of an input returns its
    stale answer here; a correct op has to compute again.
    """
    with torch.no_grad():
        for t in tensors:
            flat = t.detach().view(-1)
            half = flat.numel() // 2
            if half == 0:
                continue
            if flat.dtype == torch.uint8:  # packed codes: every byte is a valid pair of NF4 codes
                flat[half:] = torch.randint(0, 256, (flat.numel() - half,), generator=generator, dtype=torch.uint8)
                continue
            scale = flat.float().pow(2).mean().sqrt().clamp(min=0.1)
            flat[half:] = (torch.randn(flat.numel() - half, generator=generator) * scale).to(flat.dtype)
