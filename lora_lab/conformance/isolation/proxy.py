"""The target in its own process: the trusted side (inputs, oracles, comparisons, report) never imports it.

A ``RemoteTarget`` looks like a ``target.Target`` to the properties: ``provides(op)``,
``op(name)`` returning a callable, and ``model(seed, **kwargs)`` returning a model
handle. Behind it one warm child process (``child.py``, a fork of a clean server,
never of the suite's process) imports the target and answers requests over a pipe. Tensors cross as
copies, an NF4 weight as its fields; a result that needs gradients comes back
through a ``torch.autograd.Function`` whose backward asks the child for the
gradients of the inputs. So nothing the target does can patch the suite's
code, read its expected values, keep a pointer into its tensors or change the
exit status.

A crash of the child (a segfault, an abort, ``os._exit``) and a call that runs
past ``call_timeout`` seconds end the check with a verdict naming the call;
``reset()`` starts a fresh child for the next check, as the runner does after
any error.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from lora_lab.conformance.errors import CheckFailed, RemoteError, TargetCrashed, TargetImportError
from lora_lab.conformance.isolation import wire
from lora_lab.conformance.isolation.origin import source_files
from lora_lab.conformance.isolation.process import START_TIMEOUT, Child
from lora_lab.conformance.isolation.reference_clock import SAMPLES, TIMED_OPS, reference_seconds
from lora_lab.conformance.registry import over_budget


def _describe_call(op: str, args: tuple, kwargs: dict) -> str:
    def short(v):
        if isinstance(v, torch.Tensor):
            return f"{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
        if hasattr(v, "packed"):
            return f"NF4{tuple(getattr(v, 'shape', ()))}"
        return type(v).__name__ if isinstance(v, (dict, list)) else repr(v)[:20]
    inner = ", ".join([short(a) for a in args] + [f"{k}={short(v)}" for k, v in kwargs.items()])
    return f"{op}({inner})"


class _RemoteFunction(torch.autograd.Function):
    """A remote call as one autograd node: forward runs in the child, backward asks it for the input gradients."""

    @staticmethod
    def forward(ctx, call: _Call, *inputs):
        outputs = call.run()
        ctx.call = call
        extra = torch.zeros(())  # lets a call without tensor outputs through
        ctx.mark_non_differentiable(extra, *[t for t, flag in zip(outputs, call.output_grad) if not flag])
        return (*outputs, extra)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.call.backward(grads[:-1]))


# Ops that change no input in place and build nothing to differentiate: calling one twice leaves what one call would.
REPEATABLE_OPS = ("quantize_nf4", "dequantize_nf4")


class _Call:
    def __init__(self, target: RemoteTarget, op: str, args: tuple, kwargs: dict, measure_min: int | None = None,
                 watch: bool = False, tail: tuple[int, int] | None = None) -> None:
        self.target, self.op, self.args, self.kwargs, self.measure_min = target, op, args, kwargs, measure_min
        self.watch, self.tail, self.skipped = watch, tail, 0
        self.what = _describe_call(op, args, kwargs)
        self.inputs: list[torch.Tensor] = []
        self.encoded = [wire.encode(args, self.inputs), wire.encode(kwargs, self.inputs)]
        self.grad_enabled = torch.is_grad_enabled()
        self.flags = [self.grad_enabled and t.requires_grad for t in self.inputs]

    def _request(self) -> tuple[float, list]:
        """The target's reply to this call and its time by the suite's clock, around the request: the target reports
        no time of its own."""
        start = time.perf_counter()
        reply = self.target.request(["call", self.op, *self.encoded, self.flags, self.grad_enabled, self.measure_min,
                                     self.watch, None if self.tail is None else list(self.tail)], self.what)
        seconds = time.perf_counter() - start
        self.target.seconds += seconds
        return seconds, reply

    def run(self) -> list[torch.Tensor]:
        reference = self.target.time_reference(self.op, self.args, self.kwargs)  # here, before the target's turn
        seconds, reply = self._request()
        encoded, changed, self.graph, problems, self.measurement, interpreted, self.skipped = reply
        if (reference is not None and self.op in REPEATABLE_OPS and not (interpreted or problems or changed)
                and self.graph is None and over_budget(seconds, reference)):
            # One slow call can be the machine's: another process, or the first touch of fresh memory, which a VM
            # makes slow (the target's process allocates its copy of the inputs and its output; the reference, here,
            # may reuse memory). So each side is timed once more and the faster time of each counts: a slow target
            # is slow twice. Only for ops a second call leaves as one call would.
            reference = min(reference, self.target.time_reference(self.op, self.args, self.kwargs) or reference)
            again, reply = self._request()
            seconds = min(seconds, again)
            encoded, changed, self.graph, problems, self.measurement, interpreted, self.skipped = reply
        if interpreted and self.target.uses_triton:  # Triton's interpreter is Python: its time says nothing of a kernel
            self.target.interpreted += 1
        elif reference is not None:
            self.target.hold_to_budget(self.op, self.args, self.kwargs, seconds, reference)
        if problems:
            raise CheckFailed(f"{self.what}: " + "; ".join(str(p) for p in problems))
        with torch.no_grad():  # in-place semantics: what the target changed in its copy, the caller sees changed
            for index, tensor in changed:
                new = wire.decode_tensor(tensor)
                original = self.inputs[int(index)]
                if new.shape == original.shape and new.dtype == original.dtype:
                    original.copy_(new)
        self.outputs: list[torch.Tensor] = []
        self.result = wire.decode(encoded, _nf4_class(), self.outputs)
        self.output_grad = [self.graph is not None and bool(item) for item in _grad_flags(encoded)]
        return self.outputs

    def backward(self, grads) -> list:
        grads = [g if flag else None for g, flag in zip(grads, self.output_grad)]
        reply, problems = self.target.request(["backward", self.graph, wire.encode(list(grads))],
                                              f"the backward of {self.what}")
        if problems:
            raise CheckFailed(f"the backward of {self.what}: " + "; ".join(str(p) for p in problems))
        got = [wire.decode(g) for g in reply]
        wanted = sum(self.flags)
        if len(got) != wanted:
            raise TargetCrashed(f"the target's process returned {len(got)} gradients for {wanted} inputs")
        return got


def _mentions_triton(path: Path) -> bool:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    return "import triton" in text or "from triton" in text or "lora_lab.kernels" in text


def _grad_flags(encoded: Any) -> list[bool]:
    """requires_grad of each tensor in an encoded tree, in decode order."""
    if not isinstance(encoded, list) or not encoded:
        return []
    if encoded[0] == "tensor":
        return [bool(encoded[5])]
    if encoded[0] in ("list", "tuple"):
        return [f for item in encoded[1] for f in _grad_flags(item)]
    if encoded[0] == "dict":
        return [f for pair in encoded[1] for item in pair for f in _grad_flags(item)]
    if encoded[0] == "nf4":
        return [f for item in encoded[2].values() for f in _grad_flags(item)]
    return []


def _replace_tensors(value: Any, replacements: dict[int, torch.Tensor]) -> Any:
    """``value`` with each tensor replaced by ``replacements[id(tensor)]`` (the autograd node's outputs)."""
    if isinstance(value, torch.Tensor):
        return replacements.get(id(value), value)
    if isinstance(value, (list, tuple)):
        return type(value)(_replace_tensors(v, replacements) for v in value)
    if isinstance(value, dict):
        return {k: _replace_tensors(v, replacements) for k, v in value.items()}
    return value


def _nf4_class():
    from lora_lab.nf4 import NF4Tensor

    return NF4Tensor


class RemoteOp:
    """One operation of a remote target, callable like the target's own function."""

    def __init__(self, target: RemoteTarget, name: str, measure_min: int | None = None, watch: bool = False,
                 tail: tuple[int, int] | None = None) -> None:
        self.target, self.__name__, self.measure_min, self.watch, self.tail = target, name, measure_min, watch, tail
        self.last_call: _Call | None = None

    def __call__(self, *args, **kwargs):
        call = self.last_call = _Call(self.target, self.__name__, args, kwargs, self.measure_min, self.watch, self.tail)
        if not any(call.flags):
            call.run()
            return call.result
        outputs = _RemoteFunction.apply(call, *[t for t, flag in zip(call.inputs, call.flags) if flag])
        return _replace_tensors(call.result, {id(plain): out for plain, out in zip(call.outputs, outputs[:-1])})


class RemoteModel:
    """A model that lives in the target's process; its methods are ``ModelHandle.METHODS``, answered there."""

    def __init__(self, target: RemoteTarget, handle: int) -> None:
        self._target, self._handle, self._generation = target, handle, target.generation

    def __getattr__(self, method: str):
        from lora_lab.conformance.judge.model_protocol import ModelHandle

        if method not in ModelHandle.METHODS:
            raise AttributeError(f"a model handle has no method {method!r}; it offers {', '.join(ModelHandle.METHODS)}")

        def forward(*args):
            if self._generation != self._target.generation:
                raise TargetCrashed(f"the model was lost when the target's process was restarted (before {method})")
            start = time.perf_counter()
            encoded = self._target.request(["model", self._handle, method, wire.encode(list(args))], f"model.{method}()")
            self._target.seconds += time.perf_counter() - start
            return wire.decode(encoded, _nf4_class())

        return forward

    def __del__(self) -> None:
        target = self.__dict__.get("_target")
        if target is not None and target.generation == self._generation and target.child.alive:
            target.pending_frees.append(self._handle)


class RemoteFormat:
    """A target's ``NF4_FORMAT`` (``formats.py``) seen from the suite: each member a call into the target's process.

    The library's own quantized weight never crosses: it stays in the target's
    process and the suite holds a ``wire.ObjectRef`` to it, handed back as the
    argument of the next call (its qlora_linear's, its dequantize's).
    """

    def __init__(self, target: RemoteTarget, name: str, members: list[str]) -> None:
        self.name = name
        for member in members:
            setattr(self, member, RemoteOp(target, f"NF4_FORMAT.{member}"))


class RemoteTarget:
    """An implementation under test that runs in its own process; what the properties see is ``target.Target``'s API."""

    def __init__(self, spec: str, learner_folder: str | None = None, call_timeout: float | None = None,
                 name: str | None = None, chain: bool = False, wait: bool = True, preload: tuple[str, ...] = (),
                 sandboxed: bool = True) -> None:
        """``wait=False``: the process starts importing the target at once and the caller goes on with its own work
        (importing the suite); the first use of ``hello`` (or ``wait()``) takes its reply. ``preload``: modules the
        process imports after the target, before it answers (the suite's oracle process, ``isolation.stack``)."""
        self.name = name or spec
        self.spec = spec
        from lora_lab.conformance.judge.profiles import command_threads

        # the checks' thread count (profiles.command_threads: one, unless $LORA_LAB_THREADS says otherwise)
        init = {"sys_path": list(sys.path), "threads": command_threads() or torch.get_num_threads(), "target": spec,
                "learner_folder": learner_folder, "chain": chain, "preload": list(preload)}
        self.child = Child(init, call_timeout, sandboxed)
        self.seconds = 0.0  # time spent in the target's calls, by the suite's clock around each request
        self.sampled: dict[str, int] = {}  # calls per op whose time was compared with the reference's, this check
        self.timing = [0.0, 0.0]  # on those calls: the target's seconds, lora_lab's reference's seconds
        self.interpreted = 0  # calls this check that ran Triton's interpreter (not timed against the reference)
        self.timed = False  # this check is held to the time budget (Check.timed): time the reference beside the target
        self.generation = 0
        self.pending_frees: list[int] = []
        self.last_error: dict | None = None  # what the target raised last (grade explains a row with it)
        self.probed = None  # what formats.capabilities found the target's format supports, once probed
        self._uses_triton: bool | None = None
        self._hello: dict | None = None
        self.child.launch()
        if wait:
            self.wait()

    def wait(self) -> dict:
        """The started process's answer to importing the target; TargetImportError when the target does not import."""
        if self._hello is None:
            try:
                self._hello = self.child.await_hello()
            except RemoteError as exc:
                self.child.close()
                raise TargetImportError(str(exc), exc.info) from exc
        return self._hello

    @property
    def hello(self) -> dict:
        return self.wait()

    def _start(self) -> dict:
        self._hello = None
        self.child.launch()
        return self.wait()

    def retarget(self, spec: str, learner_folder: str | None = None, name: str | None = None,
                 chain: bool = False) -> None:
        """Load another target into the same warm process (grade's next exercise file); a fresh one if it died."""
        self.name, self.spec = name or spec, spec
        self.child.init.update(target=spec, learner_folder=learner_folder, chain=chain)
        self.probed, self._uses_triton = None, None
        self.generation += 1
        self.pending_frees.clear()
        if not self.child.alive:
            self._start()
            return
        try:
            self._hello = self.child.request(["init", self.child.init], "importing the target", timeout=START_TIMEOUT)
        except RemoteError as exc:
            self.child.close()
            raise TargetImportError(str(exc), exc.info) from exc

    def request(self, message: list, what: str) -> Any:
        """The child's reply to ``message``."""
        if not self.child.alive:
            self.reset()
        self.wait()  # a process started without waiting answers its init first
        while self.pending_frees:
            self.child.request(["model_free", self.pending_frees.pop()], "freeing a model")
        try:
            return self.child.request(message, what)
        except BaseException as exc:  # a remote exception (a stub's included) carries what the target raised
            if isinstance(getattr(exc, "info", None), dict):
                self.last_error = exc.info
            raise

    def time_reference(self, op: str, args: tuple, kwargs: dict) -> float | None:
        """The reference's time on this call's inputs, for the first few calls of each op in a timed check
        (``reference_clock``), or None. Speed itself is ``lora-lab bench``'s."""
        if self.timed and op in TIMED_OPS and self.sampled.get(op, 0) < SAMPLES:
            return reference_seconds(op, args, kwargs)
        return None

    @property
    def uses_triton(self) -> bool:
        """Whether the target's own source (read here, in the suite's process) uses Triton: only then does a call that
        ran Triton's interpreter escape the time budget. A target cannot claim the exemption from its process."""
        if self._uses_triton is None:
            folder = self.child.init.get("learner_folder")
            files = [Path(self.spec)] if folder else source_files(self.spec.partition(":")[0], self.child.init["sys_path"])
            self._uses_triton = any(_mentions_triton(path) for path in files)
        return self._uses_triton

    def hold_to_budget(self, op: str, args: tuple, kwargs: dict, seconds: float, reference: float) -> None:
        """Add a call timed beside the reference to ``timing`` (reported); over ``registry.TIME_BUDGET``, fail now."""
        self.sampled[op] = self.sampled.get(op, 0) + 1
        self.timing[0] += seconds
        self.timing[1] += reference
        over = over_budget(*self.timing)
        if over:  # already over: no need to wait for the check's other calls
            raise CheckFailed(f"{over}, by the call {_describe_call(op, args, kwargs)}")

    def reset(self) -> None:
        """A fresh process for the next check: after a crash, a hang or an error nothing of the last one survives."""
        self.child.close()
        self.generation += 1
        self.pending_frees.clear()
        self._hello = None
        self.child.launch()  # not waited for: it imports while the suite reports this check and draws the next one

    def close(self) -> None:
        self.child.close()

    @property
    def origin(self) -> dict[str, dict]:
        return self.hello["origin"]

    def declaration(self, name: str) -> Any:
        """A plain-data declaration of the target's module (``CAPABILITIES``, ``SELF_COMPARISONS``, ``LIBRARIES``),
        as its process read it at import."""
        return wire.decode(self.hello["declarations"].get(name))

    def nf4_format(self) -> RemoteFormat | None:
        """The target's own ``NF4_FORMAT``, its members called in the target's process; None when it has none."""
        described = self.hello.get("nf4_format")
        return None if described is None else RemoteFormat(self, described["name"], described["members"])

    def provides(self, operation: str) -> bool:
        return operation in self.hello["provides"]

    def op(self, operation: str, watch_memory: bool = False) -> RemoteOp:
        """The operation as a callable; ``watch_memory``: its inputs in guard regions and its kernels watched
        (``bounds.py``), there in the target's process, where the kernels run."""
        return RemoteOp(self, operation, watch=watch_memory)

    def tail_of_grid(self, operation: str, first: int, numel: int) -> RemoteOp:
        """The operation with only the tail of each interpreted launch's grid run, the programs of elements ``first``
        to ``numel`` (``probes.TailOfGrid``); after a call, ``op.last_call.skipped`` says how many programs did not."""
        return RemoteOp(self, operation, tail=(int(first), int(numel)))

    def measured(self, operation: str, min_numel: int, *args):
        """As ``target.Target.measured``: the measurement is taken in the target's process, around the call."""
        from lora_lab.conformance.judge.memory import seen_from_wire

        op = RemoteOp(self, operation, measure_min=min_numel)
        result = op(*args)
        saved, alive = op.last_call.measurement
        return result, seen_from_wire(saved), seen_from_wire(alive)

    def model(self, seed: int, **kwargs) -> RemoteModel:
        start = time.perf_counter()
        handle = self.request(["model_new", int(seed), wire.encode(kwargs)], f"apply_qlora(tiny_llama({seed}), ...)")
        self.seconds += time.perf_counter() - start
        return RemoteModel(self, int(handle))


