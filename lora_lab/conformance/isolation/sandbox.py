"""The target's process in a sandbox: what it can still reach of the machine, and what it cannot.

Everything here runs as the same user (root on CI and on our machines), so a separate process alone still lets the
target trace the suite, write its memory through ``/proc/<pid>/mem``, signal it, rewrite lora_lab's files or the
report, or leave a process behind. Before the target is imported, its process enters new namespaces, the kernel's
own containers (no container runtime needed; what ``unshare(1)`` and bubblewrap use):

- **user namespace**: the target keeps its user id but holds no capability outside its namespace, and the suite and
  the fork server are made non-dumpable (``make_undumpable``): the kernel refuses to let it trace them or open
  their memory;
- **pid namespace**: its process is the first child of pid 1 of a namespace of its own; it can see and signal only
  its own processes, and when it ends, pid 1 ends and the kernel ends every process it started (``PR_SET_PDEATHSIG``
  ends pid 1 with the process outside that the suite holds);
- **mount namespace**: every filesystem it sees is read-only (the project, site-packages, the exercises, the report's
  folder), ``/proc`` is its own, and ``/dev/shm``, a fresh tmpfs of its own, is its ``$TMPDIR`` and ``$HOME``;
- **network namespace**: no network but a loopback of its own;
- **no new privileges** (``PR_SET_NO_NEW_PRIVS``): no setuid program gives back what it lost.

``--sandbox auto`` (the default) uses the layers the machine offers and names the missing ones in the report;
``--sandbox require`` refuses to run a target without all of them; ``--sandbox off`` runs it as a plain process.

What no sandbox closes: the target's own process is its own. What the suite observes inside it (global state, writes
to inputs, what a forward keeps for backward, bounds under Triton's interpreter) catches mistakes, not a target that
tampers with itself; the verdicts that matter (values, time, origin) are decided in the suite's process.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

MODES = ("auto", "require", "off")
MODE_ENV = "LORA_LAB_SANDBOX"  # the mode the suite's command was given, read when each target's process starts
LAYERS = ("user namespace", "pid namespace", "mount namespace", "network namespace", "no new privileges")

# <sched.h>, <sys/mount.h> and <sys/prctl.h>: the flags of libc's unshare, mount and prctl
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MOUNT_OPTIONS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048,
                 "relatime": 1 << 21, "strictatime": 1 << 24}  # kept on a remount: a user namespace may not drop them
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
PRIVATE = "/dev/shm"  # where the sandboxed process's own tmpfs is mounted: nothing is created outside it


class SandboxUnavailable(RuntimeError):
    """``--sandbox require`` and a layer the machine does not offer: the target is not run."""


def mode() -> str:
    """The sandbox mode of this command: ``$LORA_LAB_SANDBOX``, ``auto`` when unset."""
    value = os.environ.get(MODE_ENV, "auto")
    if value not in MODES:
        raise ValueError(f"${MODE_ENV} is {value!r}; expected one of {', '.join(MODES)}")
    return value


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def make_undumpable() -> None:
    """No process without ``CAP_SYS_PTRACE`` over this one may trace it or open its memory (the suite, the fork
    server): a sandboxed target holds no capability outside its own user namespace."""
    if sys.platform.startswith("linux"):
        _libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def enter(requested: str, keep_fds: tuple[int, ...]) -> dict:
    """Put this process (a target's, before it imports anything of the target) in the sandbox.

    Forks once: the caller's process stays outside, waits for the sandboxed one and exits as it did (so the suite
    sees the same exit status and signal), and only the sandboxed one returns. Returns what was entered:
    ``{"mode", "layers": [...], "missing": {layer: why}}``; raises ``SandboxUnavailable`` under ``require``.
    """
    report: dict = {"mode": requested, "layers": [], "missing": {}}
    if requested == "off":
        report["missing"] = {layer: "--sandbox off" for layer in LAYERS}
        return report
    if not sys.platform.startswith("linux"):
        return _missing_all(report, requested, f"namespaces are Linux's ({sys.platform} here)")
    libc = _libc()
    uid, gid = os.geteuid(), os.getegid()
    try:
        _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET), "unshare")
        _map_own_ids(uid, gid)
    except OSError as exc:
        return _missing_all(report, requested, f"the kernel refused new namespaces ({exc.strerror})")
    outside = os.getpid()
    child = os.fork()
    if child:
        _wait_and_exit_as(child, keep_fds)
    # pid 1 of the new pid namespace: when it ends, the kernel ends every process in it; it ends with its parent
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if not os.path.exists(f"/proc/{outside}"):  # the parent ended before the line above: so does this process
        os._exit(1)
    report["layers"] += ["user namespace", "pid namespace", "network namespace"]
    try:
        _check(libc.unshare(CLONE_NEWNS), "unshare the mounts")
        _read_only_view(libc)
        report["layers"].append("mount namespace")
    except OSError as exc:
        report["missing"]["mount namespace"] = str(exc)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
        report["layers"].append("no new privileges")
    else:
        report["missing"]["no new privileges"] = os.strerror(ctypes.get_errno())
    report["private_dir"] = PRIVATE if "mount namespace" in report["layers"] else None
    if requested == "require" and report["missing"]:
        raise SandboxUnavailable(_refusal(report["missing"]))
    # The target runs as pid 2: pid 1 of a namespace ignores its own default-action signals (an abort() there dies of
    # SIGSEGV, not SIGABRT), so pid 1 only waits, and passes on how the target ended.
    server = os.fork()
    if server:
        _init_waits_for(server, keep_fds)
    return report


def private_environment(report: dict) -> dict[str, str]:
    """The variables that send the target's caches and temporary files to its private folder."""
    folder = report.get("private_dir")
    if not folder:
        return {}
    return {name: folder for name in ("TMPDIR", "HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR")}


def _missing_all(report: dict, requested: str, why: str) -> dict:
    report["missing"] = {layer: why for layer in LAYERS}
    if requested == "require":
        raise SandboxUnavailable(_refusal(report["missing"]))
    return report


def _refusal(missing: dict) -> str:
    reasons = "; ".join(f"{layer}: {why}" for layer, why in missing.items())
    return f"--sandbox require, and this machine does not offer every layer ({reasons}); run with --sandbox auto to " \
           "use the layers it has"


def _map_own_ids(uid: int, gid: int) -> None:
    """Inside the new user namespace the target keeps its own ids (root stays uid 0, so files read as before), and
    has no capability outside it."""
    with open("/proc/self/setgroups", "w") as handle:
        handle.write("deny")
    with open("/proc/self/uid_map", "w") as handle:
        handle.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as handle:
        handle.write(f"{gid} {gid} 1")


def _wait_and_exit_as(child: int, keep_fds: tuple[int, ...]) -> None:
    """The process outside the sandbox: the suite's handle on it. It ends as the sandboxed one ended."""
    for fd in keep_fds:
        os.close(fd)  # the pipes are the sandboxed process's alone: the suite sees EOF when it ends
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The suite's close: end the sandboxed process. Its pid 1 ends, so the wait below returns only once the kernel has
    # ended every process in the namespace.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):  # the same signal, so the suite names it ("killed by SIGSEGV")
        number = os.WTERMSIG(status)
        if number not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be caught, so need no reset
            signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def _init_waits_for(server: int, keep_fds: tuple[int, ...]) -> None:
    """Pid 1 of the namespace: it exits as the target's process did, a death by signal N as status 128 + N (pid 1 may
    not raise a signal on itself); every other process of the namespace ends with it."""
    for fd in keep_fds:
        os.close(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _, status = os.waitpid(server, 0)
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.waitstatus_to_exitcode(status))


def _read_only_view(libc: ctypes.CDLL) -> None:
    """Every mount read-only; a fresh, writable tmpfs at ``PRIVATE``; a /proc that shows only this namespace."""
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making the mounts private")
    with open("/proc/self/mountinfo") as handle:
        mounts = [line.split() for line in handle]
    for fields in sorted(mounts, key=lambda f: f[4].count("/")):
        point = fields[4].encode().decode("unicode_escape").encode()
        options = sum(MOUNT_OPTIONS.get(option, 0) for option in fields[5].split(","))
        result = libc.mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | options, None)
        if result != 0 and point == b"/":
            _check(result, "remounting / read-only")
    _check(libc.mount(b"tmpfs", PRIVATE.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=1777,size=50%"),
           f"a private tmpfs at {PRIVATE}")
    _check(libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "a /proc of its own")


def available() -> dict:
    """What ``enter("auto")`` gets on this machine, found in a throwaway process (``verify --help`` says it)."""
    if not hasattr(os, "fork"):
        return {"mode": "auto", "layers": [], "missing": {layer: "no fork() here" for layer in LAYERS}}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the probe: enters the sandbox (its outer half exits as it does) and writes what it got
        os.close(read)
        try:
            os.write(write, json.dumps(enter("auto", keep_fds=(write,))).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        text = answer.read()
    os.waitpid(pid, 0)
    return json.loads(text) if text else {"mode": "auto", "layers": [], "missing": {"probe": "it did not answer"}}


class Offered:
    """``describe(available())`` as text, found only when printed: ``verify --help`` says what this machine offers
    without every ``verify`` run forking a probe."""

    def __str__(self) -> str:
        return describe(available())


def describe(report: dict) -> str:
    """One line for a report: the layers entered, and those missing with why."""
    if report.get("mode") == "off":
        return "off (--sandbox off)"
    entered = ", ".join(report.get("layers", [])) or "none"
    missing = "; ".join(f"no {layer}: {why}" for layer, why in report.get("missing", {}).items())
    return entered + (f" ({missing})" if missing else "")


STARTUP_HOOKS = ("sitecustomize.py", "usercustomize.py")


def installation() -> dict[str, tuple[int, int]]:
    """(size, mtime) of lora_lab's own files and of site-packages' startup hooks (``.pth``, ``sitecustomize``): what a
    target that got out of its process would change so that every later run passes it. Compared after a run."""
    from lora_lab.conformance.isolation.origin import LORA_LAB_PACKAGES, source_files

    files = [path for package in LORA_LAB_PACKAGES for path in source_files(package)]
    for folder in {entry for entry in sys.path if entry.endswith(("site-packages", "dist-packages"))}:
        if os.path.isdir(folder):
            files += [os.path.join(folder, name) for name in os.listdir(folder)
                      if name.endswith(".pth") or name in STARTUP_HOOKS]
    found = {}
    for path in files:
        try:
            stat = os.stat(path)
        except OSError:
            continue
        found[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return found


def changed(before: dict, after: dict) -> list[str]:
    """Files added, removed or modified between two ``installation()`` snapshots."""
    return sorted(path for path in set(before) | set(after) if before.get(path) != after.get(path))


def use(requested: str | None) -> None:
    """A front end's --sandbox choice, for every target process started from now on (``$LORA_LAB_SANDBOX``)."""
    if requested:
        os.environ[MODE_ENV] = requested


class InstallationWatch:
    """``installation()`` when a front end starts its targets, compared once they are gone: ``tampered()`` says what
    changed (verify, grade and both pytest front ends then give no verdict), or None."""

    def __init__(self) -> None:
        self.before = installation()

    def tampered(self) -> str | None:
        files = changed(self.before, installation())
        return f"the installation changed during the run ({', '.join(files[:5])})" if files else None
