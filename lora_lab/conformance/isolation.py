"""The target in its own process: the trusted side (inputs, oracles, comparisons, report) never imports it.

A ``RemoteTarget`` looks like a ``runner.Target`` to the properties: ``provides(op)``,
``op(name)`` returning a callable, and ``model(seed, **kwargs)`` returning a model
handle. Behind it one warm child process (``child.py``, started fresh, never
forked) imports the target and answers requests over a pipe. Tensors cross as
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

import builtins
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

import torch

from lora_lab.conformance import wire

CALL_TIMEOUT_ENV = "LORA_LAB_CALL_TIMEOUT"  # seconds one call to the target may take (default 300)
START_TIMEOUT = 300.0  # importing torch, bitsandbytes and the target on a busy machine


class TargetCrashed(BaseException):
    """The target's process died during a call. A BaseException, so that hypothesis does not retry it."""


class TargetTimedOut(BaseException):
    """A call to the target ran past its time limit; its process was killed."""


class TargetImportError(ValueError):
    """The target (or a learner's file) did not import in its process; ``info`` holds its traceback."""

    def __init__(self, message: str, info: dict) -> None:
        super().__init__(message)
        self.info = info


class RemoteError(Exception):
    """An exception raised by the target in its process. Subclasses also derive from the builtin it derived from."""

    info: dict = {}


_ERROR_CLASSES: dict[str, type] = {}


def remote_exception(info: dict) -> BaseException:
    """An exception the properties can catch as they would in-process: a ValueError stays a ValueError."""
    from lora_lab.conformance.learner import StubReached

    if info.get("stub"):
        exc: BaseException = StubReached(info.get("message", ""))
    else:
        base = next((getattr(builtins, n) for n in info.get("bases", ()) if isinstance(getattr(builtins, n, None), type)
                     and issubclass(getattr(builtins, n), Exception) and n != "Exception"), None)
        key = base.__name__ if base else "Exception"
        if key not in _ERROR_CLASSES:
            _ERROR_CLASSES[key] = type(key, (base, RemoteError) if base else (RemoteError,), {"__module__": "target"})
        exc = _ERROR_CLASSES[key](info.get("message", ""))
    exc.info = info
    return exc


def _signal_name(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}" + (" (SIGABRT: an abort, e.g. glibc detected a corrupted heap)"
                                          if returncode == 134 else "")


class Child:
    """One child process running ``lora_lab.conformance.child``, and its two pipes."""

    def __init__(self, init: dict, call_timeout: float | None = None) -> None:
        self.init = init
        self.call_timeout = call_timeout if call_timeout is not None else float(os.environ.get(CALL_TIMEOUT_ENV, "300"))
        self.process: subprocess.Popen | None = None
        self.hello: dict | None = None

    def start(self) -> dict:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lora_lab.conformance.child", str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, close_fds=True,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.outbox = os.fdopen(to_child_w, "wb", buffering=0)
        self.inbox = os.fdopen(from_child_r, "rb", buffering=0)
        self.hello = self.request(["init", self.init], "importing the target", timeout=START_TIMEOUT)
        return self.hello

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def request(self, message: list, what: str, timeout: float | None = None) -> Any:
        """Send one request and wait for its reply; a crash, a hang or a malformed reply ends the check."""
        timeout = self.call_timeout if timeout is None else timeout
        try:
            wire.send(self.outbox, message)
            ready, _, _ = select.select([self.inbox], [], [], timeout)
            if not ready:
                self.close()
                raise TargetTimedOut(f"the target did not answer {what} within {timeout:.0f} s; its process was killed "
                                     f"(set {CALL_TIMEOUT_ENV} to allow more)")
            reply = wire.receive(self.inbox)
        except (EOFError, BrokenPipeError, OSError) as exc:
            code = self.process.wait(timeout=10) if self.process else None
            self.process = None
            raise TargetCrashed(f"the target's process died during {what}: {_signal_name(code)}") from exc
        except Exception as exc:  # noqa: BLE001 - a reply that is not our protocol
            self.close()
            raise TargetCrashed(f"the target's process sent a malformed reply to {what} ({exc}); it was stopped") from exc
        if not isinstance(reply, list) or not reply or reply[0] not in ("ok", "raised"):
            self.close()
            raise TargetCrashed(f"the target's process sent a malformed reply to {what}; it was stopped")
        if reply[0] == "raised":
            raise remote_exception(reply[1] if isinstance(reply[1], dict) else {})
        return reply[1]

    def close(self) -> None:
        if self.process is not None:
            for stream in (self.outbox, self.inbox):
                try:
                    stream.close()
                except OSError:
                    pass
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            self.process = None


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


class _Call:
    def __init__(self, target: RemoteTarget, op: str, args: tuple, kwargs: dict, measure_min: int | None = None,
                 watch: bool = False) -> None:
        self.target, self.op, self.args, self.kwargs, self.measure_min = target, op, args, kwargs, measure_min
        self.watch = watch
        self.what = _describe_call(op, args, kwargs)
        self.inputs: list[torch.Tensor] = []
        self.encoded = [wire.encode(args, None, self.inputs), wire.encode(kwargs, None, self.inputs)]
        self.grad_enabled = torch.is_grad_enabled()
        self.flags = [self.grad_enabled and t.requires_grad for t in self.inputs]

    def run(self) -> list[torch.Tensor]:
        reply = self.target.request(["call", self.op, *self.encoded, self.flags, self.grad_enabled, self.measure_min,
                                     self.watch], self.what)
        encoded, changed, self.graph, seconds, problems, self.measurement = reply
        self.target.seconds += float(seconds)
        if problems:
            from lora_lab.conformance.registry import CheckFailed

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
            from lora_lab.conformance.registry import CheckFailed

            raise CheckFailed(f"the backward of {self.what}: " + "; ".join(str(p) for p in problems))
        got = [wire.decode(g) for g in reply]
        wanted = sum(self.flags)
        if len(got) != wanted:
            raise TargetCrashed(f"the target's process returned {len(got)} gradients for {wanted} inputs")
        return got


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

    def __init__(self, target: RemoteTarget, name: str, measure_min: int | None = None, watch: bool = False) -> None:
        self.target, self.__name__, self.measure_min, self.watch = target, name, measure_min, watch
        self.last_call: _Call | None = None

    def __call__(self, *args, **kwargs):
        call = self.last_call = _Call(self.target, self.__name__, args, kwargs, self.measure_min, self.watch)
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
        from lora_lab.conformance.model_protocol import ModelHandle

        if method not in ModelHandle.METHODS:
            raise AttributeError(f"a model handle has no method {method!r}; it offers {', '.join(ModelHandle.METHODS)}")

        def forward(*args):
            if self._generation != self._target.generation:
                raise TargetCrashed(f"the model was lost when the target's process was restarted (before {method})")
            encoded, seconds = self._target.request(["model", self._handle, method, wire.encode(list(args))],
                                                    f"model.{method}()")
            self._target.seconds += float(seconds)
            return wire.decode(encoded, _nf4_class())

        return forward

    def __del__(self) -> None:
        target = self.__dict__.get("_target")
        if target is not None and target.generation == self._generation and target.child.alive:
            target.pending_frees.append(self._handle)


class RemoteTarget:
    """An implementation under test that runs in its own process; what the properties see is ``runner.Target``'s API."""

    def __init__(self, spec: str, learner_folder: str | None = None, call_timeout: float | None = None,
                 name: str | None = None) -> None:
        self.name = name or spec
        self.spec = spec
        init = {"sys_path": list(sys.path), "threads": torch.get_num_threads(), "target": spec,
                "learner_folder": learner_folder}
        self.child = Child(init, call_timeout)
        self.seconds = 0.0  # time spent inside the target's calls, as its process measured it
        self.generation = 0
        self.pending_frees: list[int] = []
        self.last_error: dict | None = None  # what the target raised last (grade explains a row with it)
        self.hello = self._start()

    def _start(self) -> dict:
        try:
            return self.child.start()
        except RemoteError as exc:
            self.child.close()
            raise TargetImportError(str(exc), exc.info) from exc

    def retarget(self, spec: str, learner_folder: str | None = None, name: str | None = None) -> None:
        """Load another target into the same warm process (grade's next exercise file); a fresh one if it died."""
        self.name, self.spec = name or spec, spec
        self.child.init.update(target=spec, learner_folder=learner_folder)
        self.generation += 1
        self.pending_frees.clear()
        if not self.child.alive:
            self.hello = self._start()
            return
        try:
            self.hello = self.child.request(["init", self.child.init], "importing the target", timeout=START_TIMEOUT)
        except RemoteError as exc:
            self.child.close()
            raise TargetImportError(str(exc), exc.info) from exc

    def request(self, message: list, what: str) -> Any:
        if not self.child.alive:
            self.reset()
        while self.pending_frees:
            self.child.request(["model_free", self.pending_frees.pop()], "freeing a model")
        try:
            return self.child.request(message, what)
        except BaseException as exc:  # a remote exception (a stub's included) carries what the target raised
            if isinstance(getattr(exc, "info", None), dict):
                self.last_error = exc.info
            raise

    def reset(self) -> None:
        """A fresh process for the next check: after a crash, a hang or an error nothing of the last one survives."""
        self.child.close()
        self.generation += 1
        self.pending_frees.clear()
        self.hello = self._start()

    def close(self) -> None:
        self.child.close()

    @property
    def origin(self) -> dict[str, dict]:
        return self.hello["origin"]

    @property
    def capabilities(self) -> dict | None:
        return wire.decode(self.hello.get("capabilities"))

    def provides(self, operation: str) -> bool:
        return operation in self.hello["provides"]

    def op(self, operation: str, watch_memory: bool = False) -> RemoteOp:
        """The operation as a callable; ``watch_memory``: its inputs in guard regions and its kernels watched
        (``bounds.py``), there in the target's process, where the kernels run."""
        return RemoteOp(self, operation, watch=watch_memory)

    def measured(self, operation: str, min_numel: int, *args):
        """As ``runner.Target.measured``: the measurement is taken in the target's process, around the call."""
        from lora_lab.conformance.memory import seen_from_wire

        op = RemoteOp(self, operation, measure_min=min_numel)
        result = op(*args)
        saved, alive = op.last_call.measurement
        return result, seen_from_wire(saved), seen_from_wire(alive)

    def model(self, seed: int, **kwargs) -> RemoteModel:
        start = time.perf_counter()
        handle = self.request(["model_new", int(seed), wire.encode(kwargs)], f"apply_qlora(tiny_llama({seed}), ...)")
        self.seconds += time.perf_counter() - start
        return RemoteModel(self, int(handle))
