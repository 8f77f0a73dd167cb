"""The target's process seen from the suite: starting it, one request and its reply, and what can go wrong.

``Child`` starts ``python -m lora_lab.conformance.isolation.child`` (a fresh interpreter,
never a fork) with two pipes, sends one request at a time and waits for its
reply under a time limit. What the target raised comes back as an exception of
the same builtin kind (``remote_exception``: a ValueError stays a ValueError, so
the properties catch it as they would in-process); a crash, a hang or a reply
that is not the protocol ends the check (``TargetCrashed``, ``TargetTimedOut``).
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import types
from typing import Any

from lora_lab.conformance.errors import StubReached, TargetCrashed, TargetTimedOut, remote_exception
from lora_lab.conformance.isolation.sandbox import make_undumpable
from lora_lab.conformance.isolation.sandbox import mode as sandbox_mode

CALL_TIMEOUT_ENV = "LORA_LAB_CALL_TIMEOUT"  # seconds one call to the target may take (default 300)
START_TIMEOUT = 300.0  # importing torch, bitsandbytes and the target on a busy machine


OUTPUT_ENV = "LORA_LAB_TARGET_OUTPUT"  # "1": echo what the target's process prints, marked, to stderr
SPAWN_ENV = "LORA_LAB_SPAWN"  # "1": start each target's process as a fresh interpreter (seconds), not a fork of the server
_SERVER: list = []  # the forkserver context, once started
CHILD_MODULE = "lora_lab.conformance.isolation.child"  # the target's side, named (as python -m names it), never imported here
STACK_MODULE = "lora_lab.conformance.isolation.stack_oracle"  # the suite's oracle process serves this module (stack.py)


def prepare_for_targets() -> None:
    """Prepare this process to take turns with targets' processes: idle threads sleep, the fork server starts.

    The suite and the target's process take turns: one computes while the other waits for its reply. By default
    torch's idle OpenMP threads spin for a while after each op, so on a small machine the waiting process burns the
    cores the working one needs (``lora-lab verify lora_lab`` took 3x as long): ``OMP_WAIT_POLICY=PASSIVE``. OpenMP
    reads it when torch is imported, so it takes effect only before that; targets' processes always get it. The fork
    server (``_fork_server``) is started here too, so that it imports torch while this process imports the suite.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    make_undumpable()  # no sandboxed target may trace this process or open its memory (sandbox.py)
    if _forking():
        _fork_server()


def _forking() -> bool:
    return os.environ.get(SPAWN_ENV) != "1" and hasattr(os, "fork")


def _signal_name(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    if returncode > 128:  # a sandboxed process's pid 1 passes on a death by signal N as 128 + N (sandbox.py)
        with contextlib.suppress(ValueError):
            name = signal.Signals(returncode - 128).name
            hint = " (an abort, e.g. glibc detected a corrupted heap)" if name == "SIGABRT" else ""
            return f"killed by {name}{hint}"
    return f"exit status {returncode}"


HEAP_SIGNALS = ("SIGABRT", "SIGSEGV", "SIGBUS")  # deaths that a corrupted heap causes when it is next used
EARLIER_CALLS_SHOWN = 3


def _death_signal(returncode: int | None) -> str | None:
    """The name of the signal that ended the process (a sandboxed one's pid 1 passes it on as 128 + N), or None."""
    if returncode is None:
        return None
    number = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    try:
        return signal.Signals(number).name if number else None
    except ValueError:
        return None


def blame(returncode: int | None, earlier: list[str], count: int) -> str:
    """Whom a crash during ``what`` is blamed on. A heap corrupted by a stray write is found only when memory is next
    freed or allocated (glibc's "double free or corruption" aborts then), so a death by SIGABRT, SIGSEGV or SIGBUS
    after other calls in the same process may have been caused by any of them: said to be undetermined, naming the
    last of them (``earlier``, of ``count``). A process that died in its first call, or otherwise (an exit, a kill),
    died of that call."""
    if _death_signal(returncode) not in HEAP_SIGNALS or not count:
        return ""
    shown = "; ".join(earlier[-EARLIER_CALLS_SHOWN:])
    more = f"the last {len(earlier[-EARLIER_CALLS_SHOWN:])} of " if count > len(earlier[-EARLIER_CALLS_SHOWN:]) else ""
    return (f". Which call caused it is undetermined: memory corrupted by a stray write is found only when it is next "
            f"freed or allocated, so it may be this call or one of the {count} before it in this process "
            f"({more}them: {shown}); the check names this one because the process died in it")


def _fork_server():
    """multiprocessing's forkserver, started once per suite process with torch and the child loop imported.

    Each target's process is a fork of that server: a fresh interpreter that imported
    only torch and ``lora_lab.conformance.isolation.child``, never the suite's own process, so
    it inherits none of the suite's objects. It starts in milliseconds where a new
    interpreter takes seconds to import torch (a learner's file with errors in many
    checks restarts its process after each one). The server's OpenMP threads wait
    passively (``prepare_for_targets``), and so do its forks.
    """
    if not _SERVER:
        import multiprocessing
        from multiprocessing import forkserver

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", CHILD_MODULE])
        previous = os.environ.get("OMP_WAIT_POLICY")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        # Ctrl-C is the suite's to answer (it closes its processes): the server starts ignoring it, so that it prints
        # no KeyboardInterrupt traceback from its torch import, and so do its forks. Only the main thread may do this.
        in_main_thread = threading.current_thread() is threading.main_thread()
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
        try:
            forkserver.ensure_running()
        finally:
            if in_main_thread:
                signal.signal(signal.SIGINT, sigint)
            if previous is None:
                del os.environ["OMP_WAIT_POLICY"]
            else:
                os.environ["OMP_WAIT_POLICY"] = previous
        _SERVER.append(context)
    return _SERVER[0]


class _Forked:
    """A target's process forked by the server (``_fork_server``), speaking over the two pipe ends it is given."""

    def __init__(self, read_fd: int, write_fd: int, output_fd: int, sandbox: str) -> None:
        context = _fork_server()
        self.process = context.Process(target=_serve, args=(CHILD_MODULE, _Fd(read_fd), _Fd(write_fd), _Fd(output_fd),
                                                            sandbox), daemon=True, name="target")
        # multiprocessing would have the fork import the suite's __main__ again (a script, pytest, a notebook):
        # nothing of the suite's may run there, so the fork is started as if there were no main module.
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            self.process.start()
        finally:
            sys.modules["__main__"] = main

    def exit_code(self) -> int | None:
        return self.process.exitcode

    def terminate(self) -> None:
        self.process.terminate()

    def kill(self) -> None:
        self.process.kill()

    def wait(self, timeout: float | None) -> int | None:
        self.process.join(timeout)
        return self.process.exitcode


def _serve(module: str, inbox: _Fd, outbox: _Fd, output: _Fd, sandbox: str) -> None:
    """In the fork: run the child's loop on its pipe ends, as ``python -m`` runs it in a fresh interpreter."""
    import importlib

    sys.exit(importlib.import_module(module).main(["serve", str(inbox.fd), str(outbox.fd), sandbox, str(output.fd)]))


class _Fd:
    """A file descriptor passed to the forked process (duplicated into it by multiprocessing)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __getstate__(self):
        from multiprocessing.reduction import DupFd  # pickled while the server's fork is being made: sent with it

        return {"dup": DupFd(self.fd)}

    def __setstate__(self, state) -> None:
        self.fd = state["dup"].detach()


class _Spawned:
    """A target's process started as a fresh interpreter (``python -m lora_lab.conformance.isolation.child``)."""

    def __init__(self, read_fd: int, write_fd: int, output_fd: int, sandbox: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", CHILD_MODULE, str(read_fd), str(write_fd), sandbox, str(output_fd)],
            pass_fds=(read_fd, write_fd, output_fd), stdin=subprocess.DEVNULL, close_fds=True,
            env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ},  # see prepare_for_targets
        )

    def exit_code(self) -> int | None:
        return self.process.poll()

    def terminate(self) -> None:
        self.process.terminate()

    def kill(self) -> None:
        self.process.kill()

    def wait(self, timeout: float | None) -> int | None:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


def _widen_pipe(fd: int) -> None:
    """A 1 MiB pipe buffer instead of 64 KiB (Linux): a 64 MB weight crosses in a quarter of the time."""
    import fcntl

    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except OSError:  # not Linux, or over this user's pipe quota: the default size works, only slower
        pass


class TargetOutput:
    """What the target's process prints (its stdout and stderr, glibc's fatal messages included), read on a thread of
    its own: kept out of the report and the terminal, so a target cannot print a fake table or ``Score:`` line, and
    library noise does not land between rows. ``$LORA_LAB_TARGET_OUTPUT=1`` shows it live, each line marked."""

    KEPT = 40  # lines: the last of them explain a crash

    def __init__(self, fd: int) -> None:
        import collections
        import threading

        self.lines: collections.deque[str] = collections.deque(maxlen=self.KEPT)
        self.echo = os.environ.get(OUTPUT_ENV) == "1"
        self.thread = threading.Thread(target=self._read, args=(fd,), name="target output", daemon=True)
        self.thread.start()

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as stream:
            for raw in stream:
                line = raw.decode(errors="replace").rstrip()
                self.lines.append(line)
                if self.echo:
                    print(f"  target| {line}", file=sys.stderr, flush=True)

    def last_words(self) -> str:
        """The crash's own words, when the dying process printed any (glibc's "double free or corruption", say)."""
        self.thread.join(1)  # the pipe closed with the process: what it printed last is read by now
        text = " | ".join(line for line in list(self.lines)[-3:] if line.strip())
        return f"; its last output: {text}" if text else ""


class Child:
    """One child process running ``lora_lab.conformance.isolation.child``, and its two pipes."""

    def __init__(self, init: dict, call_timeout: float | None = None, sandboxed: bool = True) -> None:
        """``sandboxed``: the target's process enters the sandbox of this command's mode (``sandbox.py``); only the
        suite's own oracle process, which never runs a target, is started without one."""
        self.init = init
        self.sandbox = sandbox_mode() if sandboxed else "off"
        self.call_timeout = call_timeout if call_timeout is not None else float(os.environ.get(CALL_TIMEOUT_ENV, "300"))
        self.process: _Forked | _Spawned | None = None
        self.owed = 0  # replies the process still owes: each message sent gets exactly one, in order
        # what this process was asked since it started (the last few, and how many): a crash's suspects
        self.calls: collections.deque[str] = collections.deque(maxlen=EARLIER_CALLS_SHOWN + 1)
        self.call_count = 0

    def launch(self) -> None:
        """Start the process and send it the target to import, without waiting: it imports while the caller works."""
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        for fd in (to_child_w, from_child_w):
            _widen_pipe(fd)
        started = _Forked if _forking() else _Spawned
        output_r, output_w = os.pipe()
        self.process = started(to_child_r, from_child_w, output_w, self.sandbox)
        os.close(to_child_r)
        os.close(from_child_w)
        os.close(output_w)
        self.output = TargetOutput(output_r)
        self.outbox = os.fdopen(to_child_w, "wb", buffering=0)
        self.inbox = os.fdopen(from_child_r, "rb", buffering=0)
        self.owed = 0
        self.calls.clear()
        self.call_count = 0
        # The target sees the suite's environment as it is now (a fork of the server would see the server's).
        self._send(["init", {**self.init, "environ": dict(os.environ)}], "importing the target")

    def await_hello(self) -> dict:
        """The reply to ``launch``'s init: what the target provides (its import error, raised here, if it fails)."""
        return self._receive("importing the target", START_TIMEOUT)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.exit_code() is None

    def request(self, message: list, what: str, timeout: float | None = None) -> Any:
        """Send one request and wait for its reply; a crash, a hang or a malformed reply ends the check."""
        self._settle(what)
        self._send(message, what)
        return self._receive(what, self.call_timeout if timeout is None else timeout)

    def _settle(self, what: str) -> None:
        """Read and drop the replies still owed to earlier messages, so that a request reads its own reply.

        A restart sends its init without waiting (``launch``); when the next thing asked of the process is another
        init (the grader's next exercise file), that restart's reply comes first: read as the new file's answer, it
        graded every later exercise as defining nothing."""
        while self.owed:
            with contextlib.suppress(Exception, StubReached):  # what the target raised answering it is no one's now
                self._receive(f"an earlier request (before {what})", START_TIMEOUT)

    def _crashed(self, what: str) -> TargetCrashed:
        code = self.process.wait(10) if self.process else None
        self.process = None
        earlier = list(self.calls)[:-1] if self.calls and self.calls[-1] == what else list(self.calls)
        return TargetCrashed(f"the target's process died during {what}: {_signal_name(code)}{self.output.last_words()}"
                             f"{blame(code, earlier, self.call_count - (len(self.calls) - len(earlier)))}")

    def _send(self, message: list, what: str) -> None:
        try:
            from lora_lab.conformance.isolation import wire  # imports torch: not at import time (`lora-lab grade -h` fast)

            if message[0] != "init":  # importing a target is not counted among a crash's suspects
                self.calls.append(what)
                self.call_count += 1
            wire.send(self.outbox, message)
        except (BrokenPipeError, OSError) as exc:
            raise self._crashed(what) from exc
        self.owed += 1

    def _receive(self, what: str, timeout: float) -> Any:
        try:
            ready, _, _ = select.select([self.inbox], [], [], timeout)
            if not ready:
                self.close()
                raise TargetTimedOut(f"the target did not answer {what} within {timeout:.0f} s; its process was killed "
                                     f"(set {CALL_TIMEOUT_ENV} to allow more)")
            from lora_lab.conformance.isolation import wire

            reply = wire.receive(self.inbox)
            self.owed -= 1
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
            if self.process.exit_code() is None:
                # SIGTERM first: a sandboxed process's outer half then ends everything in its namespace and exits only
                # once all of it is gone (sandbox.py), so nothing the target started outlives this call
                self.process.terminate()
                if self.process.wait(5) is None:
                    self.process.kill()
            self.process.wait(None)
            self.process = None
