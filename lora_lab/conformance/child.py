"""The target's own process: it imports the target and calls it, and nothing else.

``isolation.Child`` starts this module as a fresh interpreter (``python -m
lora_lab.conformance.child READ_FD WRITE_FD``: a spawn, never a fork, so the
child inherits none of the parent's objects) and talks to it over two pipes.
The child's stdout goes to stderr, so a target's prints reach the terminal but
never the protocol or the report. Each request is one framed message (see
``wire``), each gets exactly one reply, in order:

==========================================  =================================================================
request                                     reply ``["ok", ...]``
==========================================  =================================================================
``["init", {sys_path, threads, target,``    ``{"provides": [ops], "origin": {op: origin}}``; the target is
``learner_folder}]``                        imported here (a learner's file is loaded from its path)
``["call", op, args, kwargs, grad_flags,``  ``[result, changed_inputs, graph, seconds]``: the op's result;
``grad_enabled]``                           the inputs it modified ``[[index, tensor]]``; a graph number when
                                            the result needs gradients (its leaves are the inputs flagged)
``["backward", graph, grad_outputs]``       ``[gradient of each flagged input, or None]``; frees the graph
``["model_new", seed, kwargs]``             a handle number: ``ModelHandle.build`` with the target's
                                            ``apply_qlora`` on ``tiny_llama(seed)``
``["model", handle, method, args]``         ``[result, seconds]`` of ``ModelHandle.<method>(*args)``
``["model_free", handle]``                  ``None``
==========================================  =================================================================

When the target raises, the reply is ``["raised", info]`` (its exception's
builtin bases, type, message and the target's own traceback lines). A crash
or a hang is seen by the parent as a closed pipe or a silent one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any

KEPT_GRAPHS = 16  # forward graphs awaiting their backward; the oldest is dropped first


def _builtin_bases(exc: BaseException) -> list[str]:
    return [c.__name__ for c in type(exc).__mro__ if c.__module__ == "builtins"]


def _target_traceback(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/lora_lab/conformance/" not in f.filename and "/hypothesis/" not in f.filename]
    return "".join(traceback.format_list(frames[-4:])) + f"{type(exc).__name__}: {exc}"


class Server:
    """The child's side: the target, its kept autograd graphs and its models."""

    def __init__(self) -> None:
        self.target = None
        self.learner_folder: Path | None = None
        self.graphs: OrderedDict[int, tuple[list, list]] = OrderedDict()
        self.models: dict[int, Any] = {}
        self.counter = 0
        self.previous: tuple[str | None, list] = (None, [])  # the last call's outputs, and copies of their values

    def describe(self, exc: BaseException) -> dict:
        from lora_lab.conformance.learner import StubReached, learner_traceback, raised_in

        cause = exc.__cause__ if isinstance(exc, StubReached) and exc.__cause__ is not None else exc
        info = {"bases": _builtin_bases(cause), "type": type(cause).__name__, "message": str(cause),
                "traceback": _target_traceback(cause), "stub": isinstance(exc, StubReached),
                "check_failed": type(cause).__name__ == "CheckFailed", "in_learner_file": False}
        if self.learner_folder is not None:
            info["traceback"] = learner_traceback(cause, self.learner_folder)
            info["in_learner_file"] = raised_in(cause, self.learner_folder)
        return info

    def handle(self, message: list) -> list:
        kind = message[0]
        if kind == "init":
            return ["ok", self.init(message[1])]
        if kind == "call":
            return ["ok", self.call(*message[1:])]
        if kind == "backward":
            return ["ok", self.backward(*message[1:])]
        if kind == "model_new":
            return ["ok", self.model_new(*message[1:])]
        if kind == "model":
            return ["ok", self.model_call(*message[1:])]
        if kind == "model_free":
            self.models.pop(int(message[1]), None)
            return ["ok", None]
        raise ValueError(f"unknown request {kind!r}")

    def init(self, settings: dict) -> dict:
        self.target, self.learner_folder = None, None
        self.graphs.clear()
        self.models.clear()
        sys.path[:] = settings["sys_path"]
        import torch

        torch.set_num_threads(int(settings["threads"]))
        from lora_lab.conformance.origin import origin_of
        from lora_lab.conformance.registry import OPERATIONS
        from lora_lab.conformance.runner import Target

        if settings.get("learner_folder"):
            from lora_lab.conformance.learner import LearnerModule, load_learner_module

            self.learner_folder = Path(settings["learner_folder"])
            sys.path.insert(0, str(self.learner_folder))
            module = load_learner_module(Path(settings["target"]))
            self.target = Target(settings["target"], LearnerModule(module, self.learner_folder))
            raw = module
        else:
            self.target = Target.load(settings["target"])
            raw = self.target.obj
        from lora_lab.conformance import wire

        provides = [op for op in OPERATIONS if self.target.provides(op)]
        return {"provides": provides, "origin": {op: origin_of(getattr(raw, op)) for op in provides},
                "capabilities": wire.encode(getattr(raw, "CAPABILITIES", None))}

    def call(self, op: str, args, kwargs, grad_flags: list, grad_enabled: bool, measure_min: int | None = None,
             watch: bool = False) -> list:
        import torch

        from lora_lab.conformance import wire
        from lora_lab.nf4 import NF4Tensor

        tensors: list = []
        args = wire.decode(args, NF4Tensor, tensors)
        kwargs = wire.decode(kwargs, NF4Tensor, tensors)
        if watch:  # each input inside guard regions, as the property's own bounds.guarded gives them in-process
            args, kwargs, tensors = guard_inputs(args, kwargs, tensors)
        leaves = [t.requires_grad_() for t, flag in zip(tensors, grad_flags) if flag]
        before = [t.detach().clone() for t in tensors]
        versions = [t._version for t in tensors]  # counts every in-place write, a restored scratch use included
        fn = self.target.op(op)
        problems = self._late_writes("before")
        state = global_state()
        start = time.perf_counter()
        measured = Measured(measure_min) if measure_min is not None else Watched() if watch else None
        try:
            result = invoke(fn, args, kwargs, bool(grad_enabled), measured)
        except BaseException as exc:
            if not watch or type(exc).__name__ != "OutOfBounds":
                raise
            result = None  # the stray access was stopped before it happened; the log says where
        seconds = time.perf_counter() - start
        measurement = measured.summary() if isinstance(measured, Measured) else None
        if watch:
            problems += measured.problems(tensors)
        problems += [f"it changed global state: {change}" for change in state_changes(state, global_state())]
        changed = [[i, wire.encode_tensor(t)] for i, (t, b, v) in enumerate(zip(tensors, before, versions))
                   if t._version != v or not _same(t, b)]  # written: the caller's copy gets the write too
        outputs: list = []
        encoded = wire.encode(result, None, outputs)
        problems += self._late_writes("during")
        self.previous = (op, [(t, t.detach().clone()) for t in outputs if isinstance(t, torch.Tensor)])
        graph = None
        if leaves and any(isinstance(t, torch.Tensor) and t.requires_grad for t in outputs):
            graph = self._keep(outputs, leaves, tensors if watch else None)
        return [encoded, changed, graph, seconds, problems, measurement]

    def _late_writes(self, when: str) -> list[str]:
        """Outputs of the previous call whose values changed after they were returned (aliasing, a late writer)."""
        op, kept = self.previous
        if any(not _same(t, snapshot) for t, snapshot in kept):
            self.previous = (None, [])
            return [f"an output of the previous {op} call changed after it was returned ({when} this call): it shares "
                    "storage with a later output, or something writes to it later; return a tensor of its own"]
        return []

    def _keep(self, outputs: list, leaves: list, watched: list | None) -> int:
        self.counter += 1
        self.graphs[self.counter] = (outputs, leaves, watched)
        while len(self.graphs) > KEPT_GRAPHS:
            self.graphs.popitem(last=False)
        return self.counter

    def backward(self, graph: int, grad_outputs) -> list:
        import torch

        from lora_lab.conformance import wire

        if graph not in self.graphs:
            raise RuntimeError(f"graph {graph} was dropped (more than {KEPT_GRAPHS} forward calls awaited backward)")
        outputs, leaves, watched = self.graphs.pop(graph)
        grads = wire.decode(grad_outputs)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        watch = Watched() if watched is not None else contextlib.nullcontext()
        try:
            with watch:  # autograd runs a CPU backward on this thread, so the watch is entered here
                if pairs:
                    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        except BaseException as exc:
            if watched is None or type(exc).__name__ != "OutOfBounds":
                raise
        problems = watch.problems(watched) if watched is not None else []
        return [[wire.encode(leaf.grad) for leaf in leaves], problems]

    def model_new(self, seed: int, kwargs) -> int:
        from lora_lab.conformance import wire
        from lora_lab.conformance.model_protocol import ModelHandle
        from lora_lab.conformance.oracles import bitsandbytes_eager

        self.counter += 1
        with bitsandbytes_eager():  # a bitsandbytes model would otherwise recompile its dequantizer for every shape
            self.models[self.counter] = ModelHandle.build(NeutralTarget(self.target), int(seed), **wire.decode(kwargs))
        return self.counter

    def model_call(self, handle: int, method: str, args) -> list:
        from lora_lab.conformance import wire
        from lora_lab.conformance.model_protocol import ModelHandle
        from lora_lab.nf4 import NF4Tensor

        if method not in ModelHandle.METHODS:
            raise ValueError(f"ModelHandle has no remote method {method!r}")
        from lora_lab.conformance.oracles import bitsandbytes_eager

        start = time.perf_counter()
        with bitsandbytes_eager():
            result = getattr(self.models[int(handle)], method)(*wire.decode(args, NF4Tensor))
        return [wire.encode(result), time.perf_counter() - start]


# The target's functions are called from a fresh thread through a function whose code names no file of lora_lab's:
# the target's call stack holds the standard library's thread start-up and this one frame, nothing of the suite.
# A measurement's context (``memory.measure``) is entered on that thread: autograd's hooks and dispatch modes are per thread.
_NEUTRAL = {}
exec(compile(  # noqa: S102 - a fixed string, compiled only to give the frame a neutral file name
    "def call(fn, args, kwargs, grad_enabled, context, box):\n"
    "    import torch\n"
    "    try:\n"
    "        with torch.set_grad_enabled(grad_enabled), context:\n"
    "            box.append((True, fn(*args, **kwargs)))\n"
    "    except BaseException as exc:\n"
    "        box.append((False, exc))\n",
    "<call>", "exec"), _NEUTRAL)


def invoke(fn, args, kwargs=None, grad_enabled: bool = True, context=None):
    """``fn(*args, **kwargs)`` on a fresh thread whose stack shows nothing of the suite; its exception is re-raised."""
    import contextlib
    import threading

    box: list = []
    context = context if context is not None else contextlib.nullcontext()
    thread = threading.Thread(target=_NEUTRAL["call"], args=(fn, tuple(args), dict(kwargs or {}), grad_enabled, context, box),
                              name="target", daemon=True)
    thread.start()
    thread.join()
    if not box:
        raise RuntimeError("the target's call ended without a result or an exception")
    ok, value = box[0]
    if not ok:
        raise value
    return value


class Measured:
    """``memory.measure`` for tensors of ``min_numel`` elements or more, as a context entered on the call's thread."""

    def __init__(self, min_numel: int) -> None:
        from lora_lab.conformance.memory import measure

        self.context = measure(lambda n: n >= min_numel)
        self.record = None

    def __enter__(self):
        self.record = self.context.__enter__()
        return self.record

    def __exit__(self, *exc_info):
        return self.context.__exit__(*exc_info)

    def summary(self) -> list:
        """``[saved, alive]``: what autograd packed for backward, and the op outputs still alive after the call."""
        from lora_lab.conformance.memory import seen_to_wire

        return [seen_to_wire(self.record.saved), seen_to_wire(self.record.alive())]


class Watched:
    """``bounds.watch_memory`` as a context entered on the call's thread (the watch's state is per thread)."""

    def __enter__(self):
        from lora_lab.conformance.bounds import watch_memory

        self.context = watch_memory()
        self.log = self.context.__enter__()
        return self.log

    def __exit__(self, *exc_info):
        return self.context.__exit__(*exc_info)

    def problems(self, tensors: list) -> list[str]:
        """The first stray access the watch stopped, and every input whose guard region was written."""
        from lora_lab.conformance.bounds import guards_changed

        found = [self.log.accesses[0].describe()] if self.log.accesses else []
        for index, tensor in enumerate(tensors):
            side = guards_changed(tensor)
            if side:
                found.append(f"the memory just {side} of input tensor #{index} (shape {tuple(tensor.shape)}) was written")
        return found


def guard_inputs(args, kwargs, tensors: list):
    """Every input tensor (an NF4 weight's fields too) replaced by a copy inside guard regions, layout kept."""
    import dataclasses

    from lora_lab.conformance.bounds import guarded

    def guard(t):
        if t.is_contiguous():
            return guarded(t)
        order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
        return guarded(t.permute(order).contiguous()).permute([order.index(d) for d in range(t.dim())])

    replacement = {id(t): guard(t) for t in tensors}

    def swap(value):
        if id(value) in replacement:
            return replacement[id(value)]
        if isinstance(value, (list, tuple)):
            return type(value)(swap(v) for v in value)
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if dataclasses.is_dataclass(value) and hasattr(value, "packed"):
            return dataclasses.replace(value, **{f.name: swap(getattr(value, f.name)) for f in dataclasses.fields(value)})
        return value

    return swap(args), swap(kwargs), [replacement[id(t)] for t in tensors]


class NeutralTarget:
    """The target as ``ModelHandle`` calls it: each operation runs through ``invoke``, on a stack free of the suite."""

    def __init__(self, target) -> None:
        self.target = target

    def op(self, operation: str):
        import torch

        fn = self.target.op(operation)
        return lambda *args, **kwargs: invoke(fn, args, kwargs, torch.is_grad_enabled())


def global_state() -> dict:
    """What a functional op must leave as it found it: the RNGs, default dtype, threads and numerics flags."""
    import random

    import torch

    return {
        "torch's RNG (torch.manual_seed or a draw)": torch.get_rng_state(),
        "Python's random module": random.getstate(),
        "torch.get_default_dtype()": torch.get_default_dtype(),
        "torch.get_num_threads()": torch.get_num_threads(),
        "torch.are_deterministic_algorithms_enabled()": torch.are_deterministic_algorithms_enabled(),
        "torch.get_float32_matmul_precision()": torch.get_float32_matmul_precision(),
        "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def state_changes(before: dict, after: dict) -> list[str]:
    import torch

    changes = []
    for name, value in before.items():
        same = torch.equal(value, after[name]) if isinstance(value, torch.Tensor) else value == after[name]
        if not same:
            shown = "" if isinstance(value, (torch.Tensor, tuple)) else f" ({value} -> {after[name]})"
            changes.append(name + shown)
    return changes


def _same(after, before) -> bool:
    import torch

    if after.shape != before.shape or after.dtype != before.dtype:
        return False
    a = after.detach()
    return torch.equal(a, before) or (a.is_floating_point() and torch.equal(torch.nan_to_num(a), torch.nan_to_num(before)))


def main(argv: list[str]) -> int:
    from lora_lab.conformance import wire

    inbox = os.fdopen(int(argv[1]), "rb", buffering=0)
    outbox = os.fdopen(int(argv[2]), "wb", buffering=0)
    os.dup2(2, 1)  # the target's prints go to stderr, never into the report on stdout
    server = Server()
    while True:
        try:
            message = wire.receive(inbox)
        except EOFError:
            return 0
        try:
            reply = server.handle(message)
        except BaseException as exc:  # noqa: BLE001 - every exception of the target goes back as a reply
            reply = ["raised", server.describe(exc)]
        try:
            wire.send(outbox, reply)
        except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be encoded
            wire.send(outbox, ["raised", server.describe(exc)])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
