"""What a forward pass keeps for backward, measured: the machinery of the memory properties.

QLoRA's saving is that no dense base weight exists between forward and
backward: the weight is stored in 4 bits and dequantized on the fly. A layer
that keeps ``W`` dequantized for its backward (bitsandbytes did until 2024: about
13 GB on a 9B model) or forms ``W + s * B @ A`` still computes the right numbers,
so only a measurement catches it. Two instruments, used together:

- ``saved_tensors_hooks`` (``torch.autograd.graph``) sees every tensor autograd
  packs for backward: the ones ``save_for_backward`` stores and the ones built-in
  ops save (``x @ M^T`` with M requiring grad saves M);
- a ``TorchDispatchMode`` sees every tensor any torch op creates during the
  forward; a weak reference to each tells afterwards whether it is still alive,
  which also catches a tensor kept as a ``ctx`` attribute or in a cache, where no
  hook looks.

A third instrument needs neither: a census of every tensor alive in the target's
process (``storages_alive``, the garbage collector's view), taken before
``apply_qlora`` and again after it or after a forward. What is new, is not
reachable from the model, and has a base weight's element count is a dense copy
kept somewhere else (a module-level dict, a cache), whether or not the other two
instruments were on when it was made.

The first two see torch operations only. A Triton kernel's tiles live in registers (or,
under ``TRITON_INTERPRET=1``, in small numpy arrays) and never appear: what
they do show is every buffer the host code around a kernel allocates, which is
where a dense weight would be made.
"""

from __future__ import annotations

import contextlib
import gc
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lora_lab.conformance.errors import CheckFailed


@dataclass(frozen=True)
class Seen:
    """One tensor: where it came from, its shape and dtype."""

    where: str  # the op that made it, or the module whose forward saved it
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def __str__(self) -> str:
        return f"{tuple(self.shape)} {str(self.dtype).replace('torch.', '')} ({self.where})"


class _Created(TorchDispatchMode):
    """Weak references to the outputs of every op whose element count ``wanted(numel)`` accepts."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """No ``torch._disable_dynamo`` wrapper (TorchDispatchMode's documented opt-out): the wrapper imports
        TorchDynamo on the first op, 2 s in a target's process; this mode records eager calls and is never traced."""
        return False

    def __init__(self, wanted: Callable[[int], bool]) -> None:
        super().__init__()
        self.wanted = wanted
        self.refs: list[tuple[Seen, weakref.ref]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and self.wanted(t.numel()):
                self.refs.append((Seen(str(func.overloadpacket.__name__), tuple(t.shape), t.dtype), weakref.ref(t)))
        return out


@dataclass
class Record:
    """What one measured forward pass saved for backward, made, and left alive."""

    saved: list[Seen] = field(default_factory=list)  # everything autograd packed for backward
    created: list[Seen] = field(default_factory=list)  # op outputs of the sizes asked for
    _refs: list[tuple[Seen, weakref.ref]] = field(default_factory=list, repr=False)

    def alive(self) -> list[Seen]:
        """The recorded op outputs still alive now (call it after the forward's temporaries are gone).

        Only a tensor that is still referenced needs a garbage collection to tell whether a cycle alone keeps it:
        a dead weak reference never comes back, so when none is alive the answer is already known. A full
        collection walks every object of torch, transformers and bitsandbytes (0.3 s here), once per drawn layer.
        """
        if all(ref() is None for _, ref in self._refs):
            return []
        gc.collect()
        return [seen for seen, ref in self._refs if ref() is not None]


@contextlib.contextmanager
def measure(wanted: Callable[[int], bool], context: Callable[[], str] = lambda: "autograd") -> Iterator[Record]:
    """Record what the code in the block saves for backward, and the op outputs whose size ``wanted`` accepts.

    ``context()`` names where a saved tensor came from (a module's name, for
    a model); the tensors themselves are passed through untouched.
    """
    record = Record()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        record.saved.append(Seen(context(), tuple(tensor.shape), tensor.dtype))
        return tensor

    created = _Created(wanted)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), created:
        yield record
    record.created = [seen for seen, _ in created.refs]
    record._refs = created.refs


def seen_to_wire(seen: list[Seen]) -> list[list]:
    """``Seen`` records as plain lists, to cross from the target's process."""
    return [[s.where, list(s.shape), str(s.dtype).removeprefix("torch.")] for s in seen]


def seen_from_wire(items: list[list]) -> list[Seen]:
    """``seen_to_wire``'s lists read back; a dtype is accepted only as the name of one of torch's dtypes."""
    return [Seen(str(where), tuple(int(d) for d in shape), _dtype_named(dtype)) for where, shape, dtype in items]


def _dtype_named(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"expected the name of a torch dtype, got {name!r}")
    return dtype


HALF = (torch.float16, torch.bfloat16)


def tracked_layers(model, dense, quantized: list[str], module_at) -> tuple[dict, dict, list, list]:
    """For each quantized layer: (N, K) from the dense twin, and hooks that note the layer running now and the
    sizes of its input and output (each layer runs once per forward)."""
    shapes, activation_sizes, stack, hooks = {}, {}, [], []

    def enter(module, args, name):
        stack.append(name)
        rows = args[0].numel() // shapes[name][1]
        activation_sizes[name] = {args[0].numel(), rows * shapes[name][0]} if args[0].dtype in HALF else set()

    def leave(module, args, output) -> None:  # returns None: a forward hook's return value would replace the output
        stack.pop()

    for name in quantized:
        reference = dense.get_submodule(name)
        shapes[name] = (reference.out_features, reference.in_features)
        module = module_at(model, name)
        hooks.append(module.register_forward_pre_hook(lambda m, args, name=name: enter(m, args, name)))
        hooks.append(module.register_forward_hook(leave))
    return shapes, activation_sizes, stack, hooks


def model_kept_for_backward(model, dense, batch, forward, quantized: list[str], module_at) -> dict:
    """What a model's forward on ``batch`` keeps for backward: tensors with a quantized layer's N x K elements
    (``kept``) and fp32 copies of a layer's half-precision activations (``copies``); ``layers`` is how many were watched."""
    shapes, activation_sizes, stack, hooks = tracked_layers(model, dense, quantized, module_at)
    if not shapes:
        return {"layers": 0, "kept": [], "copies": []}
    sizes = {n * k for n, k in shapes.values()}
    try:
        with measure(lambda n: n in sizes, context=lambda: stack[-1] if stack else "outside the quantized layers") as record:
            logits = forward()
    finally:
        for hook in hooks:
            hook.remove()
    kept = [s for s in record.saved + record.alive() if s.dtype.is_floating_point and s.numel in sizes]
    copies = [s for s in record.saved if s.dtype == torch.float32 and s.numel in activation_sizes.get(s.where, ())]
    logits.float().sum().backward()
    return {"layers": len(shapes), "kept": seen_to_wire(kept), "copies": seen_to_wire(copies)}


def storages_alive(collect: bool = True) -> dict[int, tuple[Seen, weakref.ref]]:
    """Every tensor storage the garbage collector can see in this process, each once: ``{data_ptr: (a tensor on it,
    a weak reference to that tensor)}``, keyed as ``reachable_storages`` keys what a model reaches. A tensor that a
    module-level dict or a cache keeps is here, however far it is from any model.

    ``collect`` first frees what only a reference cycle keeps (0.3 s with torch and transformers loaded): needed for
    the census after, not for the one before, whose entries count only while their weak reference is alive (a
    storage freed since may have lent its address to a new tensor). ``type(obj)`` rather than ``isinstance``: an
    object may answer ``__class__`` with anything. A tensor with no storage of its own (a wrapper subclass) is
    skipped; the tensors it wraps are found themselves.
    """
    if collect:
        gc.collect()
    alive = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor):
            continue
        try:
            storage = obj.untyped_storage()
            key = storage.data_ptr()
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        if obj.device.type != "meta" and storage.nbytes() and key not in alive:
            seen = Seen("alive in the target's process, reached from no model", tuple(obj.shape), obj.dtype)
            alive[key] = (seen, weakref.ref(obj))
    return alive


def stray_weights(before: dict[int, tuple[Seen, weakref.ref]], reachable: set[int], sizes: set[int]) -> list[Seen]:
    """Tensors alive now that were not alive ``before`` and are not ``reachable`` (from the model), with one of a base
    weight's element counts (``sizes``): dense copies of a weight kept outside the model."""
    existed = lambda key: key in before and before[key][1]() is not None  # noqa: E731
    return [seen for key, (seen, _) in storages_alive().items()
            if not existed(key) and key not in reachable and seen.dtype.is_floating_point and seen.numel in sizes]


def reachable_storages(obj, storages: dict[int, int], skip: Callable[[str], bool] = lambda name: False,
                       seen: set[int] | None = None) -> None:
    """Add the storages of every tensor reachable from ``obj``'s attributes (modules, containers, plain objects) to
    ``storages`` (``{data_ptr: nbytes}``), leaving out a module's parameters, buffers and submodules ``skip`` names."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType, types.MethodType, str, bytes)):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "meta" and obj.untyped_storage().nbytes():
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        children = list(getattr(obj, "__dict__", {}).values())  # bitsandbytes' Params4bit keeps its quant_state here
    elif isinstance(obj, nn.Module):
        children = [v for k, v in vars(obj).items() if k not in ("_parameters", "_buffers", "_modules")]
        for group in ("_parameters", "_buffers", "_modules"):
            children += [v for k, v in getattr(obj, group).items() if not skip(k)]
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    else:
        children = list(getattr(obj, "__dict__", {}).values())
    for child in children:
        reachable_storages(child, storages, skip, seen)


def assert_no_stray_weights(model, when: str) -> None:
    """CheckFailed when the target's process holds a dense copy of a base weight that ``model`` (a handle built with
    ``census=True``) does not reach: memory spent all the same, which a census of the model alone never sees."""
    stray = seen_from_wire(model.stray_weights())
    if stray:
        listed = ", ".join(str(s) for s in stray[:3]) + (f" and {len(stray) - 3} more" if len(stray) > 3 else "")
        raise CheckFailed(f"{when} the target's process holds {len(stray)} tensor(s) with a linear layer's weight size "
                          f"that the model does not reach: {listed}; a dense copy of a base weight kept outside the model "
                          "(a module-level dict, a cache) is memory QLoRA must not spend, wherever it is kept")
