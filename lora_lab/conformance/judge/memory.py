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

Both see torch operations only. A Triton kernel's tiles live in registers (or,
under ``TRITON_INTERPRET=1``, in small numpy arrays) and never appear: what
they do show is every buffer the host code around a kernel allocates, which is
where a dense weight would be made.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode


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
