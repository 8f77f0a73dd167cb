"""The compile-only process: the target's kernels compiled for sm_90a and sm_80 with the arguments the checks launched.

    python -m lora_lab.conformance.grading.compile_process < request.json     (what ``gpu_compile`` runs)

The request is ``{"launches": [record, ...], "archs": ["sm_90a", "sm_80"], "jobs": N}``, each record one launch as the target's
process wrote it down (``isolation.kernel_launches``); the reply, on stdout, a list with one result per launch and
target: ``{"kernel", "file", "arch", "launch", "error", "registers", "spill_bytes", "shared", "shared_limit"}``.

Triton decides when a kernel is defined whether it is interpreted, so this process starts with ``TRITON_INTERPRET=0``
(a learner's file only sets it with ``setdefault``) and ``LORA_LAB_COMPILE_ONLY=1`` (``lora_lab.kernels`` refuses to
import without a GPU otherwise), imports the module each kernel was defined in, and compiles it through Triton's own
binder as ``kernel[grid](...)`` would, with stand-in CPU tensors of the recorded dtypes and alignment
(``lora_lab.kernels.compile``'s method). Importing the file runs its top level: the process enters the same sandbox
as the target's (``isolation.sandbox``) first, and what it reports, like everything observed in a process that ran the
target's code, catches mistakes, not a file that tampers with its own compile.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ENVIRONMENT = {"TRITON_INTERPRET": "0", "LORA_LAB_COMPILE_ONLY": "1"}


def stand_in(kind: list):
    """The argument a recorded kind stands for: a CPU tensor of its dtype and alignment, the integer itself, ..."""
    import torch
    import triton.language as tl

    tag = kind[0]
    if tag == "tensor":
        dtype = getattr(torch, kind[1])
        buffer = torch.empty(64, dtype=dtype)
        return buffer if kind[2] or buffer.element_size() >= 16 else buffer[1:]  # one element in: not 16-byte aligned
    if tag in ("constexpr", "int", "float", "bool"):
        return kind[1]
    if tag == "tl_dtype":
        return tl.dtype(kind[1])
    if tag == "none":
        return None
    raise TypeError(f"an argument of type {kind[1]} cannot be recreated to compile the kernel")


def kernel_module(record: dict):
    """The module the kernel was defined in, imported here with Triton compiling (its folder first on the path)."""
    folder = str(Path(record["file"]).parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # a learner's file, and the ones it imports from (from ex07_triton_dequant import ...)
    return importlib.import_module(record["module"])


def _jit(kernel):
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):  # an Autotuner or heuristics wraps the JITFunction in .fn
        inner = getattr(kernel, "fn", None)
        if inner is None or inner is kernel:
            raise TypeError(f"{type(kernel).__name__} is not a Triton kernel defined compiled: was TRITON_INTERPRET=1 "
                            "forced when the file was imported? (set it with os.environ.setdefault, as the exercise does)")
        kernel = inner
    return kernel


def _def_line(jit) -> int:
    """The file's line number of the kernel's ``def`` (Triton numbers a kernel's lines from it; decorators come first)."""
    import inspect

    try:
        lines, first = inspect.getsourcelines(jit.fn)
    except (OSError, TypeError):
        return 0
    return first + next((i for i, line in enumerate(lines) if line.lstrip().startswith("def ")), 0)


def compile_record(record: dict, arch: str) -> dict:
    """Compile one recorded launch for ``arch``: ptxas' registers, spills and shared memory, or the full error."""
    from lora_lab.kernels.compile.compile_check import ARCHS, SMEM_LIMIT, compile_bound

    result = {"kernel": record["kernel"], "file": record["file"], "arch": arch, "error": "", "registers": 0,
              "spill_bytes": 0, "shared": 0, "shared_limit": SMEM_LIMIT[ARCHS[arch]], "seconds": 0.0,
              "line": 0}
    start = time.perf_counter()
    try:
        jit = _jit(getattr(kernel_module(record), record["kernel"]))
        result["line"] = _def_line(jit)
        kwargs = {name: stand_in(kind) for name, kind in record["arguments"].items()} | record["options"]
        compiled, report = compile_bound(jit, (), kwargs, arch)
        result.update(registers=report.registers, spill_bytes=max(report.spill_stores, report.spill_loads),
                      shared=compiled.metadata.shared)
    except Exception as error:  # noqa: BLE001 - every failure to compile is the finding
        result["error"] = f"{type(error).__name__}: {error}".strip()
        if error.__cause__ is not None and str(error.__cause__) not in result["error"]:
            result["error"] += f"\n{type(error.__cause__).__name__}: {error.__cause__}"
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def main() -> int:
    """Enter the sandbox, import Triton while the suite still checks values, then read the request, compile each
    launch for each target (each compile is one core's work), and write the results where the target's prints
    cannot go."""
    reply = os.dup(1)
    os.dup2(2, 1)  # the target's prints (its file runs on import) go to stderr, never into the reply
    from lora_lab.conformance.isolation import sandbox

    entered = sandbox.enter(sandbox.mode(), keep_fds=(reply,))
    os.environ.update(ENVIRONMENT)
    os.environ.update(sandbox.private_environment(entered))  # Triton's cache and ptxas' files: the sandbox's own folder
    import torch  # noqa: F401 - imported before the request comes: the suite is still busy with the drive call
    import triton.compiler  # noqa: F401

    from lora_lab.kernels.compile import compile_check, sass  # noqa: F401

    request = json.load(sys.stdin)
    global _JOBS
    _JOBS = [(record, arch) for record in request["launches"] for arch in request["archs"]]
    for record in request["launches"]:  # imported once here, so that the forked workers share it
        with contextlib.suppress(Exception):  # an import error is each compile's to report
            kernel_module(record)
    # In parallel only from 4 cores: on 2 (shared with other work) the four compiles of exercise 08 took 7.1-7.6 s in
    # two processes and 6.2-9.0 s in one, which also stops at the first error.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(len(_JOBS), cores if cores >= 4 else 1, int(request.get("jobs", 0)) or len(_JOBS))
    if workers > 1:
        with ProcessPoolExecutor(workers, multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile_job, range(len(_JOBS))))
    else:  # one at a time: the first error is the verdict (the check reports only it), so the rest are not compiled
        results = []
        for index in range(len(_JOBS)):
            results.append(_compile_job(index))
            if results[-1]["error"]:
                break
    with os.fdopen(reply, "w") as out:
        json.dump(results, out)
    return 0


_JOBS: list[tuple[dict, str]] = []  # (record, arch), which the forked workers read by index


def _compile_job(index: int) -> dict:
    return compile_record(*_JOBS[index])


if __name__ == "__main__":
    sys.exit(main())
