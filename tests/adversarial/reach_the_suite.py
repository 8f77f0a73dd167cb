"""Exploit: reach out of the target's process at import. It signals and traces the suite's process, writes its memory
through /proc/<pid>/mem, appends to lora_lab's own source, drops a .pth file into site-packages (every later run would
import it), connects to a port the suite listens on, and leaves a process behind to rewrite the report after the suite
exits; then it answers wrong. In the sandbox (isolation/sandbox.py) each attempt fails, as LIBRARIES records for
tests/adversarial/test_sandbox.py, and the wrong answer is rejected as before. Unsandboxed it attacks nothing."""

import ctypes
import os
import socket
import sys
import time
from pathlib import Path

import torch

import lora_lab

REJECTED_BY = "loss.matches_shift_and_mask"
SUITE = int(os.environ.get("PROBE_SUITE_PID", "0"))
LIBC = ctypes.CDLL(None, use_errno=True)


def attempt(action) -> str:
    try:
        action()
    except BaseException as exc:  # noqa: BLE001 - the outcome is the report
        return f"{type(exc).__name__}: {exc}"[:160]
    return "done"


def errno_check(result: int) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def write_memory() -> None:
    with open(f"/proc/{SUITE}/mem", "r+b") as memory:
        memory.write(b"\0")


def write_project() -> None:
    with open(Path(lora_lab.__file__).parent / "zz_probe.py", "w") as handle:
        handle.write("")


def write_site_packages() -> None:
    site = next(p for p in sys.path if p.endswith("site-packages"))
    Path(site, "zz_probe.pth").write_text("")


def connect() -> None:
    socket.create_connection(("127.0.0.1", int(os.environ.get("PROBE_PORT", "9"))), timeout=2).close()


def leave_a_process() -> None:
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            LIBC.prctl(15, b"lora-lab-leftov", 0, 0, 0)  # PR_SET_NAME: how the test finds it
            time.sleep(120)
        os._exit(0)


def private_tmp() -> None:
    Path(os.environ["TMPDIR"], "scratch").write_text("mine")


SANDBOXED = os.getpid() == 2 and os.getppid() == 1  # the first process pid 1 started, in a pid namespace of its own
LIBRARIES = {"sandboxed": SANDBOXED}
if SANDBOXED:
    LIBRARIES.update({
        "signal": attempt(lambda: os.kill(SUITE, 0)), "ptrace": attempt(lambda: errno_check(LIBC.ptrace(16, SUITE, 0, 0))),
        "memory": attempt(write_memory), "project": attempt(write_project), "site-packages": attempt(write_site_packages),
        "network": attempt(connect), "leftover": attempt(leave_a_process), "private tmp": attempt(private_tmp),
        "processes": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    })


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    return logits.float().logsumexp(-1).mean()  # wrong: no labels at all
