"""The target's process seen from the suite: starting it, one request and its reply, and what can go wrong.

``Child`` starts ``python -m lora_lab.conformance.child`` (a fresh interpreter,
never a fork) with two pipes, sends one request at a time and waits for its
reply under a time limit. What the target raised comes back as an exception of
the same builtin kind (``remote_exception``: a ValueError stays a ValueError, so
the properties catch it as they would in-process); a crash, a hang or a reply
that is not the protocol ends the check (``TargetCrashed``, ``TargetTimedOut``).
"""

from __future__ import annotations

import builtins
import os
import select
import signal
import subprocess
import sys
from typing import Any

CALL_TIMEOUT_ENV = "LORA_LAB_CALL_TIMEOUT"  # seconds one call to the target may take (default 300)
START_TIMEOUT = 300.0  # importing torch, bitsandbytes and the target on a busy machine


def wait_passively() -> None:
    """Make this process's OpenMP threads sleep, not spin, while they wait (``OMP_WAIT_POLICY=PASSIVE``).

    The suite and the target's process take turns: one computes while the other waits for its reply. By default
    torch's idle OpenMP threads spin for a while after each op, so on a small machine the waiting process burns the
    cores the working one needs (``lora-lab verify lora_lab`` took 3x as long). OpenMP reads this when torch is
    imported, so it takes effect only before that; the target's process always gets it (``Child.launch``).
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
    elif info.get("check_failed"):  # a property's own verdict, reached in the target's process (a model handle's)
        from lora_lab.conformance.registry import CheckFailed

        exc = CheckFailed(info.get("message", ""))
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
        self.launch()
        return self.await_hello()

    def launch(self) -> None:
        """Start the process and send it the target to import, without waiting: it imports while the caller works."""
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lora_lab.conformance.child", str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, close_fds=True,
            env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ},  # see wait_passively
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.outbox = os.fdopen(to_child_w, "wb", buffering=0)
        self.inbox = os.fdopen(from_child_r, "rb", buffering=0)
        self._send(["init", self.init], "importing the target")

    def await_hello(self) -> dict:
        """The reply to ``launch``'s init: what the target provides (its import error, raised here, if it fails)."""
        self.hello = self._receive("importing the target", START_TIMEOUT)
        return self.hello

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def request(self, message: list, what: str, timeout: float | None = None) -> Any:
        """Send one request and wait for its reply; a crash, a hang or a malformed reply ends the check."""
        self._send(message, what)
        return self._receive(what, self.call_timeout if timeout is None else timeout)

    def _crashed(self, what: str) -> TargetCrashed:
        code = self.process.wait(timeout=10) if self.process else None
        self.process = None
        return TargetCrashed(f"the target's process died during {what}: {_signal_name(code)}")

    def _send(self, message: list, what: str) -> None:
        try:
            from lora_lab.conformance import wire  # imports torch: not at import time (`lora-lab grade -h` stays fast)

            wire.send(self.outbox, message)
        except (BrokenPipeError, OSError) as exc:
            raise self._crashed(what) from exc

    def _receive(self, what: str, timeout: float) -> Any:
        try:
            ready, _, _ = select.select([self.inbox], [], [], timeout)
            if not ready:
                self.close()
                raise TargetTimedOut(f"the target did not answer {what} within {timeout:.0f} s; its process was killed "
                                     f"(set {CALL_TIMEOUT_ENV} to allow more)")
            from lora_lab.conformance import wire

            reply = wire.receive(self.inbox)
        except (EOFError, BrokenPipeError, OSError) as exc:
            raise self._crashed(what) from exc
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
