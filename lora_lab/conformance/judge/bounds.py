"""Out-of-bounds reads and writes of Triton kernels, caught on a CPU under Triton's interpreter.

On a GPU a load without a mask past the end of a tensor is an illegal memory
access or silent garbage; under the interpreter it quietly reads whatever lies
next in host memory, so a kernel that forgets its mask passes every value check
(its stray values are usually masked out at the store). Triton 3.x's
interpreter has no bounds checking of its own (``TRITON_INTERPRET=1`` offers
only integer-overflow sanitizing; ``TRITON_ENABLE_ASAN`` instruments compiled
GPU code), so this module adds it, in two layers:

1. ``watch_memory()`` wraps the interpreter's memory operations (masked load
   and store, atomics): every address a kernel touches with its mask on must
   lie inside one of the tensors that launch was given. The first one outside
   stops the kernel *before* it is read or written (so a wild store cannot
   corrupt the grader) and is recorded with the kernel, the argument, the side
   (before its first or past its last element) and by how many elements.
   The argument named is the one the pointer was computed from: each pointer
   argument's value is tagged with its parameter's name, and the tag follows it
   through the pointer arithmetic (``_PROPAGATING``). When a tensor is passed as
   two arguments (an output passed again as a dummy bias pointer) the nearest
   tensor alone could not tell them apart. Where the tag was lost (an op that does
   not carry it), every argument holding the nearest tensor is named.
2. ``guarded()`` places each input inside a larger allocation whose guard
   regions hold a sentinel (NaN for floats, the poison byte 0xFF for packed
   codes): a read that slips past layer 1 shows as a non-finite output, a write
   as a changed guard (``guards_changed``). This layer needs nothing from
   Triton's internals, so it still works if those change.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

GUARD_ELEMENTS = 1024  # sentinel elements before and after each guarded tensor
POISON_BYTE = 0xFF


class OutOfBounds(BaseException):
    """A kernel touched memory outside every tensor of its launch; a BaseException so no ``except Exception`` hides it."""


@dataclass(frozen=True)
class Access:
    kernel: str
    kind: str  # "load" or "store"
    argument: str  # the kernel parameter the pointer was computed from (else the one whose tensor is nearest)
    side: str  # "before the start" or "past the end"
    elements: int  # how many distinct elements on that side this one operation touched
    aliases: tuple[str, ...] = ()  # other parameters given the same tensor
    traced: bool = True  # whether ``argument`` is the pointer's own parameter (False: only the nearest tensor's)

    def describe(self) -> str:
        text = (f"kernel {self.kernel} {'read' if self.kind == 'load' else 'wrote'} {self.elements} element(s) "
                f"{self.side} of {self.argument}")
        if not self.aliases:
            return text
        others = " and ".join(self.aliases)
        if self.traced:
            return f"{text} (through {self.argument}; the same tensor is also passed as {others})"
        return f"{text} or {others} (one tensor passed as each; the {self.kind} went through one of them)"


@dataclass
class _Launch:
    kernel: str
    ranges: list[tuple[str, int, int]]  # (parameter, first byte, one past the last byte)
    pending: list[tuple[str, int]] = field(default_factory=list)  # (parameter, data_ptr) not yet tagged, in order


@dataclass
class MemoryLog:
    """What ``watch_memory`` saw: the out-of-bounds accesses, and whether it could watch at all."""

    active: bool = False
    launches: int = 0
    accesses: list[Access] = field(default_factory=list)


def _extent(tensor: torch.Tensor) -> tuple[int, int]:
    """First byte and one past the last byte that ``tensor``'s elements occupy (its strides included)."""
    if tensor.numel() == 0:
        return tensor.data_ptr(), tensor.data_ptr()
    size = tensor.element_size()
    low = sum(min(0, (n - 1) * s) for n, s in zip(tensor.shape, tensor.stride()))
    high = sum(max(0, (n - 1) * s) for n, s in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr() + low * size, tensor.data_ptr() + (high + 1) * size


_state = threading.local()


def _check(addresses, mask, itemsize: int, kind: str, sources: tuple[str, ...] = ()) -> None:
    """Raise OutOfBounds for the first active address outside every tensor of the current launch.

    ``sources``: the parameters the pointers were computed from (their tag), when it survived the arithmetic."""
    launch: _Launch | None = getattr(_state, "launch", None)
    log: MemoryLog | None = getattr(_state, "log", None)
    if launch is None or log is None:
        return
    import numpy as np

    active = np.asarray(addresses, dtype=np.uint64).reshape(-1)[np.broadcast_to(np.asarray(mask), np.shape(addresses))
                                                                  .reshape(-1).astype(bool)]
    if active.size == 0:
        return
    inside = np.zeros(active.shape, dtype=bool)
    for _, low, high in launch.ranges:
        inside |= (active >= low) & (active + itemsize <= high)
    if inside.all():
        return
    stray = active[~inside]
    address = int(stray[0])

    def distance(entry):
        _, low, high = entry
        return low - address if address < low else address + itemsize - high

    traced = [entry for entry in launch.ranges if entry[0] in sources]
    candidates = traced or launch.ranges
    name, low, high = min(candidates, key=distance) if candidates else ("no tensor argument", address + 1, address + 1)
    aliases = tuple(other for other, lo, hi in launch.ranges if (lo, hi) == (low, high) and other != name)
    side = "before the start" if address < low else "past the end"
    elements = int(np.unique(stray[(stray < low) if address < low else (stray >= low)]).size)
    access = Access(launch.kernel, kind, name, side, elements, aliases, bool(traced))
    log.accesses.append(access)
    raise OutOfBounds(access.describe())


TAG = "lora_lab_argument"  # the key of a pointer's tag in the interpreter's TensorHandle.attr
# The builder's operations that make a pointer from pointers (the first argument after the builder, or for a select
# both choices): the result carries their tags. Others (a pointer cast to an integer and back, say) drop the tag.
_PROPAGATING = {"create_addptr": (0,), "create_splat": (1,), "create_broadcast": (0,), "create_expand_dims": (0,),
                "create_reshape": (0,), "create_trans": (0,), "create_select": (1, 2), "create_cat": (0, 1),
                "create_join": (0, 1)}


def _sources(handle) -> tuple[str, ...]:
    return tuple(getattr(handle, "attr", None) and handle.attr.get(TAG, ()) or ())


def _propagating(original, positions: tuple[int, ...]):
    def operation(self, *args):
        result = original(self, *args)
        sources = tuple(dict.fromkeys(name for i in positions if i < len(args) for name in _sources(args[i])))
        if sources and hasattr(result, "attr"):
            result.attr = {**result.attr, TAG: sources}
        return result

    return operation


def _patches():
    """(object, attribute, replacement) for the interpreter's launch, pointer arithmetic and memory operations."""
    from triton.runtime import interpreter

    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    original_call, load, store = executor.__call__, builder.create_masked_load, builder.create_masked_store
    rmw, cas, convert = builder.create_atomic_rmw, builder.create_atomic_cas, interpreter._implicit_cvt

    def call(self, *args, **kwargs):
        names = list(self.arg_names)
        given = [*zip(names, args), *kwargs.items()]
        given.sort(key=lambda item: names.index(item[0]) if item[0] in names else len(names))  # the kernel's order
        ranges = [(name, *_extent(value)) for name, value in given if isinstance(value, torch.Tensor)]
        previous = getattr(_state, "launch", None)
        _state.launch = _Launch(getattr(self.fn, "__name__", "kernel"), ranges,
                                [(name, value.data_ptr()) for name, value in given if isinstance(value, torch.Tensor)])
        if getattr(_state, "log", None) is not None:
            _state.log.launches += 1
        try:
            return original_call(self, *args, **kwargs)
        finally:
            _state.launch = previous

    def implicit_cvt(arg):
        """The interpreter's conversion of a launch argument; a tensor's pointer is tagged with its parameter's name
        (the first untagged parameter given a tensor at this address: the interpreter converts in the kernel's order)."""
        converted = convert(arg)
        launch = getattr(_state, "launch", None)
        if launch is not None and hasattr(arg, "data_ptr") and hasattr(converted, "handle"):
            for i, (name, pointer) in enumerate(launch.pending):
                if pointer == arg.data_ptr():
                    del launch.pending[i]
                    converted.handle.attr = {**converted.handle.attr, TAG: (name,)}
                    break
        return converted

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        _check(ptrs.data, mask.data, interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize, "load", _sources(ptrs))
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        _check(ptrs.data, mask.data, value.data.dtype.itemsize, "store", _sources(ptrs))
        return store(self, ptrs, value, mask, cache_policy)

    def atomic_rmw(self, op, ptr, val, mask, sem, scope):
        _check(ptr.data, mask.data, val.data.dtype.itemsize, "store", _sources(ptr))
        return rmw(self, op, ptr, val, mask, sem, scope)

    def atomic_cas(self, ptr, cmp, val, sem, scope):
        _check(ptr.data, True, val.data.dtype.itemsize, "store", _sources(ptr))
        return cas(self, ptr, cmp, val, sem, scope)

    arithmetic = [(builder, name, _propagating(getattr(builder, name), positions))
                  for name, positions in _PROPAGATING.items() if name in builder.__dict__]
    return [(executor, "__call__", call), (interpreter, "_implicit_cvt", implicit_cvt),
            (builder, "create_masked_load", masked_load), (builder, "create_masked_store", masked_store),
            (builder, "create_atomic_rmw", atomic_rmw), (builder, "create_atomic_cas", atomic_cas), *arithmetic]


_lock = threading.Lock()


@contextlib.contextmanager
def watch_memory() -> Iterator[MemoryLog]:
    """Check every memory access of every Triton kernel launched inside, under the interpreter.

    Yields a ``MemoryLog``; ``log.active`` is False (and nothing is checked) when
    Triton is missing or does not run interpreted, e.g. compiled on a GPU.
    """
    import os

    log = MemoryLog()
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield log
        return
    try:
        patches = _patches()
    except (ImportError, AttributeError):  # no Triton, or an interpreter whose internals moved
        yield log
        return
    with _lock:
        saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        log.active, _state.log = True, log
        try:
            yield log
        finally:
            _state.log = None
            for owner, name, original in saved:
                setattr(owner, name, original)


def guarded(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` living inside a larger allocation whose guard regions hold a sentinel.

    NaN for floating-point tensors, ``POISON_BYTE`` for integer ones. The copy has
    ``tensor``'s shape, dtype and strides' layout (contiguous).
    """
    sentinel = float("nan") if tensor.is_floating_point() else POISON_BYTE
    storage = torch.full((tensor.numel() + 2 * GUARD_ELEMENTS,), sentinel, dtype=tensor.dtype, device=tensor.device)
    inner = storage[GUARD_ELEMENTS : GUARD_ELEMENTS + tensor.numel()].view(tensor.shape)
    inner.copy_(tensor)
    return inner


def guards_changed(tensor: torch.Tensor) -> str | None:
    """``"before the start"`` or ``"past the end"`` if a guard region around ``guarded(...)``'s tensor was written."""
    base = tensor._base
    if base is None:
        return None
    base = base.reshape(-1)
    before, after = base[:GUARD_ELEMENTS], base[GUARD_ELEMENTS + tensor.numel() :]
    for side, region in (("before the start", before), ("past the end", after)):
        if tensor.is_floating_point():
            if not torch.isnan(region).all():
                return side
        elif not bool((region == POISON_BYTE).all()):
            return side
    return None
