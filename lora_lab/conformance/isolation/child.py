"""The target's own process: it imports the target and calls it, and nothing else.

``process.Child`` starts it as a fork of a clean server process (a fresh
interpreter that imported only torch and this module, ``process._fork_server``;
with ``LORA_LAB_SPAWN=1``, as ``python -m lora_lab.conformance.isolation.child READ_FD WRITE_FD``),
never as a fork of the suite's process, so it inherits none of the suite's objects,
and talks to it over two pipes.
The child's stdout goes to stderr, so a target's prints reach the terminal but
never the protocol or the report. Each request is one framed message (see
``wire``), each gets exactly one reply, in order:

==========================================  =================================================================
request                                     reply ``["ok", ...]``
==========================================  =================================================================
``["init", {sys_path, threads, target,``    ``{"provides": [ops], "origin": {op: origin}}``; the target is
``learner_folder}]``                        imported here (a learner's file is loaded from its path)
``["call", op, args, kwargs, grad_flags,``  ``[result, changed_inputs, graph, problems, measurement,``
``grad_enabled, measure_min, watch,``       ``interpreted, skipped]``: the op's result; the inputs it modified
``tail]``                                   ``[[index, tensor]]``; a graph number when the result needs
                                            gradients (its leaves are the inputs flagged); what the probes
                                            found; whether Triton's interpreter ran (the suite times the call);
                                            with ``tail = [first, numel]``, how many interpreted programs
                                            before element ``first`` were not run (``probes.TailOfGrid``)
``["backward", graph, grad_outputs]``       ``[gradient of each flagged input, or None]``; frees the graph
``["model_new", seed, kwargs]``             a handle number: ``ModelHandle.build`` with the target's
                                            ``apply_qlora`` on ``tiny_llama(seed)``
``["model", handle, method, args]``         the result of ``ModelHandle.<method>(*args)``
``["model_free", handle]``                  ``None``
==========================================  =================================================================

When the target raises, the reply is ``["raised", info]`` (its exception's
builtin bases, type, message and the target's own traceback lines). A crash
or a hang is seen by the parent as a closed pipe or a silent one.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from lora_lab.conformance.errors import CheckFailed, StubReached, raised_by_a_library, raised_by_the_suite, user_traceback
from lora_lab.conformance.isolation import kernel_launches, sandbox, wire
from lora_lab.conformance.isolation.learner_files import (
    as_stub,
    chain_to_learner,
    learner_traceback,
    load_learner_module,
    raised_in,
)
from lora_lab.conformance.isolation.origin import origin_of
from lora_lab.conformance.isolation.probes import (
    Entered,
    Measured,
    StateWatch,
    TailOfGrid,
    Watched,
    guard_inputs,
    interpreted_launches,
    invoke,
    same_values,
)
from lora_lab.conformance.isolation.process import STACK_MODULE
from lora_lab.conformance.isolation.target import Target
from lora_lab.conformance.isolation.wire import ObjectStore
from lora_lab.conformance.judge.autograd import backward
from lora_lab.conformance.registry import OPERATIONS
from lora_lab.nf4 import NF4Tensor

KEPT_GRAPHS = 16  # forward graphs awaiting their backward; the oldest is dropped first
DECLARATIONS = ("CAPABILITIES", "SELF_COMPARISONS", "LIBRARIES")  # plain data a target module may declare
FORMAT_MEMBERS = ("quantize", "dequantize", "codes", "levels", "absmax", "to_nf4", "from_nf4")  # formats.py


def _builtin_bases(exc: BaseException) -> list[str]:
    return [c.__name__ for c in type(exc).__mro__ if c.__module__ == "builtins"]


class Server:
    """The child's side: the target, its kept autograd graphs and its models."""

    def __init__(self, sandboxed: dict | None = None, refused: Exception | None = None) -> None:
        self.sandboxed = sandboxed or {}  # what sandbox.enter entered; its report goes back with every init
        self.refused = refused  # --sandbox require on a machine without every layer: no target is imported
        self.target = None
        self.functions: dict[str, Any] = {}  # the target's own function for each operation it provides
        self.learner_folder: Path | None = None
        self.graphs: OrderedDict[int, tuple[list, list]] = OrderedDict()
        self.models: dict[int, Any] = {}
        self.objects = ObjectStore()  # what the target returned that cannot cross (a library's own quantized weight)
        self.counter = 0
        self.previous: tuple[str | None, list] = (None, [])  # the last call's outputs, and copies of their values

    def describe(self, exc: BaseException) -> dict:
        cause = exc.__cause__ if isinstance(exc, StubReached) and exc.__cause__ is not None else exc
        info = {"bases": _builtin_bases(cause), "type": type(cause).__name__, "message": str(cause),
                "traceback": user_traceback(cause), "stub": isinstance(exc, StubReached),
                "check_failed": isinstance(cause, CheckFailed), "library": raised_by_a_library(cause),
                "in_learner_file": False}
        if self.learner_folder is not None:
            info["traceback"] = (user_traceback(cause) if raised_by_the_suite(cause)  # the grader's error, said so
                                 else learner_traceback(cause, self.learner_folder))
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
        if kind == "launches":  # the target's own Triton launches so far, for the compile check (kernel_launches)
            return ["ok", kernel_launches.recorded()]
        if kind == "model_free":
            self.models.pop(int(message[1]), None)
            return ["ok", None]
        raise ValueError(f"unknown request {kind!r}")

    def init(self, settings: dict) -> dict:
        self.target, self.learner_folder, self.functions = None, None, {}
        self.graphs.clear()
        self.models.clear()
        self.objects.clear()
        if self.refused is not None:
            raise self.refused
        sys.path[:] = settings["sys_path"]
        if "environ" in settings:  # the suite's environment now, not the fork server's from when it started
            os.environ.clear()
            os.environ.update(settings["environ"])
        os.environ.update(sandbox.private_environment(self.sandboxed))  # caches and temporary files: its own folder
        os.environ["LIBC_FATAL_STDERR_"] = "1"  # glibc's fatal messages to stderr (the suite's reader), not /dev/tty
        torch.set_num_threads(int(settings["threads"]))
        chained: list[str] = []
        if settings.get("learner_folder"):
            self.learner_folder = Path(settings["learner_folder"])
            sys.path.insert(0, str(self.learner_folder))
            module = load_learner_module(Path(settings["target"]))
            if settings.get("chain"):  # grade --chain: the learner's own earlier pieces instead of the reference's
                chained = chain_to_learner(module, self.learner_folder)
            loaded = Target(settings["target"], module)
        else:
            loaded = Target.load(settings["target"])
        # the launches of the target's own kernels are recorded as the checks run them, for the compile check
        kernel_launches.install(self.learner_folder or kernel_launches.folder_of(loaded.obj))
        provided = [op for op in OPERATIONS if loaded.provides(op)]
        self.functions = {op: loaded.op(op) for op in provided if op != "NF4_FORMAT"}
        fmt, described = loaded.nf4_format(), None
        if fmt is not None:  # its members are called like operations; what they return stays here (wire.ObjectRef)
            members = [m for m in FORMAT_MEMBERS if callable(getattr(fmt, m, None))]
            self.functions.update({f"NF4_FORMAT.{m}": getattr(fmt, m) for m in members})
            described = {"name": str(getattr(fmt, "name", type(fmt).__name__)), "members": members}
        oracle = getattr(loaded.obj, "ORACLE", None) if settings["target"] == STACK_MODULE else None
        self.functions.update({f"ORACLE.{name}": fn for name, fn in (oracle or {}).items()})  # the suite's own oracles
        for module in settings.get("preload", ()):
            importlib.import_module(module)
        self.target = NeutralTarget(self)
        declarations = {name: wire.encode(loaded.declaration(name)) for name in DECLARATIONS}
        return {"provides": provided, "origin": {op: origin_of(loaded.op(op)) for op in provided},
                "declarations": declarations, "nf4_format": described, "chained": chained, "sandbox": self.sandboxed}

    def run_op(self, op: str, args, kwargs, grad_enabled: bool, context=None):
        """The target's own function for ``op``, called on a neutral thread; a learner's stub ends the check."""
        try:
            return invoke(self.functions[op], args, kwargs, grad_enabled, context)
        except NotImplementedError as exc:
            if self.learner_folder is None:
                raise
            raise as_stub(exc, self.learner_folder)  # noqa: B904 - the stub keeps its NotImplementedError as __cause__

    def call(self, op: str, args, kwargs, grad_flags: list, grad_enabled: bool, measure_min: int | None = None,
             watch: bool = False, tail: list | None = None) -> list:
        tensors: list = []
        args = wire.decode(args, NF4Tensor, tensors, self.objects)
        kwargs = wire.decode(kwargs, NF4Tensor, tensors, self.objects)
        if watch:  # each input inside guard regions, as the property's own bounds.guarded gives them in-process
            args, kwargs, tensors = guard_inputs(args, kwargs, tensors)
        leaves = [t.requires_grad_() for t, flag in zip(tensors, grad_flags) if flag]
        before = [t.detach().clone() for t in tensors]
        versions = [t._version for t in tensors]  # counts every in-place write, a restored scratch use included
        problems = self._late_writes("before")
        state = StateWatch()
        measured = Measured(measure_min) if measure_min is not None else Watched() if watch else None
        launches = interpreted_launches()
        try:
            tailed = TailOfGrid(*tail) if tail is not None else None  # only the grid's tail runs (probes.TailOfGrid)
            result = self.run_op(op, args, kwargs, bool(grad_enabled), Entered(state, measured, tailed))
        except BaseException as exc:
            if not watch or type(exc).__name__ != "OutOfBounds":
                raise
            result = None  # the stray access was stopped before it happened; the log says where
        interpreted = interpreted_launches() > launches  # Triton's interpreter ran: the time is Python's, not the kernel's
        measurement = measured.summary() if isinstance(measured, Measured) else None
        if watch:
            problems += measured.problems(tensors)
        if state.changes:
            problems.append(f"it changed global state: {', '.join(state.changes)}; an operation must leave the process "
                            "as it found it (save and restore what you change, or use a local torch.Generator)")
        changed = [[i, wire.encode_tensor(t)] for i, (t, b, v) in enumerate(zip(tensors, before, versions))
                   if t._version != v or not same_values(t, b)]  # written: the caller's copy gets the write too
        outputs: list = []
        encoded = wire.encode(result, outputs, self.objects)
        problems += self._late_writes("during")
        # A format's accessors (to_nf4, codes, ...) may return views of the weight they are given; an operation may not.
        held = {t.untyped_storage().data_ptr() for t in tensors if t.numel()} if not op.startswith("NF4_FORMAT.") else set()
        if any(t.numel() and t.untyped_storage().data_ptr() in held for t in outputs if isinstance(t, torch.Tensor)):
            problems.append("it returned a tensor that shares storage with one of its inputs; expected a new tensor")
        self.previous = (op, [(t, t.detach().clone()) for t in outputs if isinstance(t, torch.Tensor)])
        graph = None
        if leaves and any(isinstance(t, torch.Tensor) and t.requires_grad for t in outputs):
            graph = self._keep(outputs, leaves, tensors if watch else None)
        return [encoded, changed, graph, problems, measurement, interpreted, tailed.skipped if tailed else 0]

    def _late_writes(self, when: str) -> list[str]:
        """Outputs of the previous call whose values changed after they were returned (aliasing, a late writer)."""
        op, kept = self.previous
        if any(not same_values(t, snapshot) for t, snapshot in kept):
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
        if graph not in self.graphs:
            raise RuntimeError(f"graph {graph} was dropped (more than {KEPT_GRAPHS} forward calls awaited backward)")
        outputs, leaves, watched = self.graphs.pop(graph)
        grads = wire.decode(grad_outputs)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        watch = Watched() if watched is not None else contextlib.nullcontext()
        try:
            with watch:  # autograd runs a CPU backward on this thread, so the watch is entered here
                if pairs:
                    backward([o for o, _ in pairs], [g for _, g in pairs])
        except BaseException as exc:
            if watched is None or type(exc).__name__ != "OutOfBounds":
                raise
        problems = watch.problems(watched) if watched is not None else []
        return [[wire.encode(leaf.grad) for leaf in leaves], problems]

    def model_new(self, seed: int, kwargs) -> int:
        from lora_lab.conformance.judge.model_protocol import ModelHandle
        self.counter += 1  # the target's libraries as they come (bitsandbytes compiles its dequantizer): no eager stance
        self.models[self.counter] = ModelHandle.build(self.target, int(seed), **wire.decode(kwargs))
        return self.counter

    def model_call(self, handle: int, method: str, args) -> list:
        from lora_lab.conformance.judge.model_protocol import ModelHandle
        if method not in ModelHandle.METHODS:
            raise ValueError(f"ModelHandle has no remote method {method!r}")
        result = getattr(self.models[int(handle)], method)(*wire.decode(args, NF4Tensor, None, self.objects))
        return wire.encode(result, None, self.objects)


class NeutralTarget:
    """The target as ``ModelHandle`` calls it: each operation runs through ``Server.run_op``, on a stack free of the suite."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def provides(self, operation: str) -> bool:
        return operation in self.server.functions

    def op(self, operation: str):
        if operation != "training_step":  # apply_qlora draws the adapters' initial values: it uses the RNG, seeded for it
            return lambda *args, **kwargs: self.server.run_op(operation, args, kwargs, torch.is_grad_enabled())

        def watched(*args, **kwargs):  # watched on the call's own thread, as each op call is
            state = StateWatch()
            result = self.server.run_op(operation, args, kwargs, torch.is_grad_enabled(), Entered(state))
            if state.changes:
                raise CheckFailed(f"{operation} changed global state: {', '.join(state.changes)}; an operation must "
                                  "leave the process as it found it (save and restore what you change, or use a local "
                                  "torch.Generator)")
            return result

        return watched


def main(argv: list[str]) -> int:
    """``serve IN OUT SANDBOX OUTPUT``: answer the suite's requests on two pipes, inside the sandbox (``sandbox.py``),
    with everything printed going to the third (``process.TargetOutput``)."""
    pipes = (int(argv[1]), int(argv[2]))
    output = int(argv[4])
    os.dup2(output, 1)  # the target's prints, and glibc's fatal messages (LIBC_FATAL_STDERR_), reach the suite's
    os.dup2(output, 2)  # reader, never the report on stdout or the terminal between rows
    os.close(output)
    try:  # before anything of the target is imported; only the sandboxed process returns
        entered, refused = sandbox.enter(argv[3] if len(argv) > 3 else sandbox.mode(), keep_fds=pipes), None
    except sandbox.SandboxUnavailable as exc:
        entered, refused = {}, exc  # the reply to the first request (the target's init) says so
    inbox = os.fdopen(pipes[0], "rb", buffering=0)
    outbox = os.fdopen(pipes[1], "wb", buffering=0)
    # Ctrl-C reaches every process of the terminal's group: it is the suite's to answer (it closes this process),
    # not a KeyboardInterrupt traceback of this one's under the command's "interrupted".
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server = Server(entered, refused)
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
        except BrokenPipeError:  # the suite closed this process (Ctrl-C, or it is done): no one is left to answer
            return 0
        except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be encoded
            wire.send(outbox, ["raised", server.describe(exc)])




# The fork server imports this module before it forks any target: from then on no target may trace it.
sandbox.make_undumpable()

if __name__ == "__main__":
    sys.exit(main(sys.argv))
