"""How many kernels a GPU test run compiles, counted on a machine without a GPU, and whether they fit the time.

    python -m lora_lab.kernels.compile.specializations                  # every group of GPU_TEST_GROUPS
    python -m lora_lab.kernels.compile.specializations --groups         # the groups, one "name<TAB>-k expression" a line
    python -m lora_lab.kernels.compile.specializations --json out.json  # and the counts per group

Why
---
On a GPU, ``tests/triton_kernels/test_kernels.py`` spends its time compiling, not
running: Triton compiles a kernel once per *specialization* (its constexprs, the
tile, which integer arguments are 1 or multiples of 16, which pointers are
aligned), and each test draws shapes, dtypes and options that make new ones.
fp32 compiles in 2.6-4.8 CPU s per kernel, fp16/bf16 in about a second, and a
pytest step that is killed at its time limit loses its junit XML. So
``benchmarks/gpu_check.sh`` runs the tests in the groups of ``GPU_TEST_GROUPS``,
side by side, and ``tests/triton_kernels/test_compile_budget.py`` fails when a
group's count or its estimated compile time grows past ``BUDGET``.

How
---
The test file is run by pytest in a child process whose kernels are defined
compiled (``LORA_LAB_COMPILE_ONLY=1``, as ``compile_check`` does), with the
``ci`` profile and ``LORA_LAB_AUTOTUNE=0`` as on the GPU. Every kernel launch is
recorded instead of run; its arguments go through Triton's own binder, whose
``(specialization, options)`` is Triton's cache key. The tests' own assertions
then fail on the unwritten outputs; those failures are dropped inside each
hypothesis example (so hypothesis draws exactly what a passing GPU run draws,
without shrinking) and for every plain test.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import pytest

TEST_FILE = Path(__file__).resolve().parents[2] / "tests" / "triton_kernels" / "test_kernels.py"
# The pytest steps of benchmarks/gpu_check.sh: name -> -k expression. Every test of the file is in exactly one group
# (the autotuned tests run in their own step, which benchmarks every config and is not counted here).
GPU_TEST_GROUPS = {
    "test_kernels_float64": "test_forward_and_gradients_match_float64",
    "test_kernels_small_m": "test_every_kernel_path and small_m",
    "test_kernels_fused": "test_every_kernel_path and fused",
    "test_kernels_dense": "test_every_kernel_path and dense",
    # nf4_dequantize alone: its tests draw the most specializations (blocksizes, dtypes, double quant), cheap ones
    "test_kernels_dequantize": "test_dequantize and not autotuned",
    "test_kernels_rest": "not autotuned and not test_forward_and_gradients_match_float64 and not test_every_kernel_path "
                         "and not test_dequantize",
}
# What each group may compile: at most this many specializations, and at most this many estimated CPU seconds of
# compiling, 64% of the 220 s cap of its step in gpu_check.sh (a process compiles one kernel at a time), with the
# estimates of COMPILE_SECONDS about twice what was measured.
BUDGET = {"specializations": 50, "seconds": 140.0}
# Estimated CPU seconds to compile one specialization for sm_90a, by kernel and its first argument's dtype: about
# twice compile_check's "time" column on a 2-core AMD EPYC with Triton 3.9 (bf16: matmuls 0.6-1.3 s, small M 1.0 s
# (1.5 s at most in the 2026-12-06 sweeps, Triton 3.6 and 3.9 alike), its reduction 0.2-0.9 s in every dtype,
# dequantize 0.1-0.3 s; fp32 matmuls 1.6-3.5 s, whose tl.dot in IEEE precision is scalar FMAs), and fp32's 4.8 s,
# the most issue 27 saw on the GPU machine with Triton 3.6. The reduction's first
# argument is its fp32 workspace whatever x's dtype, so it has one estimate. And to build one C launcher: Triton 3.6
# compiles one per signature with gcc.
COMPILE_SECONDS = {
    "qlora_forward_kernel": {"float32": 4.8, "default": 2.6},
    "qlora_grad_input_kernel": {"float32": 4.8, "default": 2.6},
    "qlora_small_m_kernel": {"float32": 2.4, "default": 2.4},
    "qlora_small_m_reduce_kernel": {"default": 1.6},
    "nf4_dequantize_kernel": {"default": 0.5},
}
LAUNCHER_SECONDS = 1.5
KERNEL_MODULES = {
    "qlora_forward_kernel": "lora_lab.kernels.qlora_forward",
    "qlora_grad_input_kernel": "lora_lab.kernels.qlora_backward",
    "qlora_small_m_kernel": "lora_lab.kernels.qlora_small_m",
    "qlora_small_m_reduce_kernel": "lora_lab.kernels.qlora_small_m",
    "nf4_dequantize_kernel": "lora_lab.kernels.nf4_dequantize",
}


class SpecializationRecorder:
    """A pytest plugin: every kernel launch in the tests is recorded as Triton's cache key, and nothing runs."""

    def __init__(self) -> None:
        self.keys: dict[tuple, float] = {}  # (kernel, specialization, options) -> estimated seconds to compile it
        self.launchers: set[tuple] = set()  # (kernel, argument types): one C launcher each
        self.tests: list[str] = []  # the tests the group selected
        self._patches = ExitStack()

    def pytest_sessionstart(self, session) -> None:
        from lora_lab.kernels.compile.launches import Launch

        for name, module_name in KERNEL_MODULES.items():
            module = importlib.import_module(module_name)
            kernel = getattr(module, name)
            recorder = type("Recorder", (), {"__getitem__": lambda _, grid, name=name, kernel=kernel: (
                lambda *args, **kwargs: self.record(Launch(name, kernel, args, kwargs, grid)))})()
            self._patches.enter_context(mock.patch.object(module, name, recorder))
            # The tensors stay on the CPU: only their dtypes, strides and alignment reach the binder.
            self._patches.enter_context(mock.patch.object(module, "check_device", lambda *t: None, create=True))
        dispatch = importlib.import_module("lora_lab.kernels.fused_qlora_linear")
        self._patches.enter_context(mock.patch.object(dispatch, "check_device", lambda *t: None))

    def pytest_collection_finish(self, session) -> None:
        self.tests = [item.nodeid.split("::", 1)[1] for item in session.items]

    def pytest_sessionfinish(self, session) -> None:
        self._patches.close()

    def record(self, launch) -> None:
        from lora_lab.kernels.compile.launches import kept_configs

        for config in kept_configs(launch):
            kernel, specialization, options = specialization_key(launch, config)
            seconds = COMPILE_SECONDS[kernel]
            dtype = str(launch.args[0].dtype).removeprefix("torch.")  # x, dY, or the packed weight
            self.keys.setdefault((kernel, specialization, options), seconds.get(dtype, seconds["default"]))
            self.launchers.add((kernel, tuple(type(a).__name__ if not hasattr(a, "dtype") else str(a.dtype)
                                              for a in launch.args)))

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items) -> None:
        """Inside each hypothesis example the test's verdict is dropped: hypothesis then neither stops nor shrinks."""
        for item in items:
            handle = getattr(getattr(item, "obj", None), "hypothesis", None)
            if handle is not None and not getattr(handle.inner_test, "_verdict_dropped", False):
                handle.inner_test = _drop_verdict(handle.inner_test)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        outcome = yield
        outcome.force_result(None)  # a plain test's assertions see unwritten outputs: only its launches count

    def estimated_seconds(self) -> float:
        return sum(self.keys.values()) + LAUNCHER_SECONDS * len(self.launchers)


def _drop_verdict(test):
    def run(*args, **kwargs):
        try:
            test(*args, **kwargs)
        except Exception:  # noqa: BLE001, S110 - the outputs were never written; only the launches matter here
            pass

    run._verdict_dropped = True
    return run


def specialization_key(launch, config) -> tuple[str, str, str]:
    """Triton's cache key for ``launch`` with ``config`` on sm_90a: what ``kernel[grid](...)`` compiles once."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = launch.kernel
    while not isinstance(jit, JITFunction):
        jit = jit.fn
    kwargs = dict(launch.kwargs, **(config.all_kwargs() if config is not None else {}))
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    _, specialization, options = binder(*launch.args, **kwargs)
    return launch.name, str(specialization), str(options)


def count(group: str, test_file: Path = TEST_FILE) -> dict:
    """The specializations and C launchers the tests of ``group`` compile (run in this process, kernels compiled)."""
    recorder = SpecializationRecorder()
    start = time.perf_counter()
    status = pytest.main([str(test_file), "-q", "-p", "no:cacheprovider", "-k", GPU_TEST_GROUPS[group],
                          "--hypothesis-profile=ci", "-o", "addopts="], plugins=[recorder])
    by_kernel: dict[str, int] = {}
    for kernel, _, _ in recorder.keys:
        by_kernel[kernel] = by_kernel.get(kernel, 0) + 1
    return {"group": group, "k": GPU_TEST_GROUPS[group], "pytest_status": int(status),
            "specializations": len(recorder.keys), "launchers": len(recorder.launchers), "by_kernel": by_kernel,
            "estimated_compile_seconds": round(recorder.estimated_seconds(), 1),
            "recorded_in_seconds": round(time.perf_counter() - start, 1), "tests": recorder.tests}


def over_budget(result: dict) -> list[str]:
    """Why a group's compiling does not fit ``BUDGET`` (empty when it fits)."""
    found = []
    if result["specializations"] > BUDGET["specializations"]:
        found.append(f"{result['specializations']} specializations, over {BUDGET['specializations']}")
    if result["estimated_compile_seconds"] > BUDGET["seconds"]:
        found.append(f"about {result['estimated_compile_seconds']:.0f} s of compiling, over {BUDGET['seconds']:.0f} s")
    if result["pytest_status"] not in (0, 5) or not result["specializations"]:
        found.append(f"recording failed (pytest exit {result['pytest_status']}, {result['specializations']} recorded)")
    return found


def main(argv: list[str] | None = None) -> int:
    """Print each group's count; exit 1 if one is over budget."""
    parser = argparse.ArgumentParser(prog="python -m lora_lab.kernels.compile.specializations",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", action="store_true", help="print the groups (name, tab, -k expression) and exit")
    parser.add_argument("--group", action="append", choices=tuple(GPU_TEST_GROUPS), help="only this group (repeatable)")
    parser.add_argument("--json", help="write the counts to this file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.groups:
        print("\n".join(f"{name}\t{k}" for name, k in GPU_TEST_GROUPS.items()))
        return 0
    from lora_lab.kernels import common

    if common.INTERPRETING or not common.COMPILE_ONLY or common.AUTOTUNE:
        env = dict(os.environ, TRITON_INTERPRET="0", LORA_LAB_COMPILE_ONLY="1", LORA_LAB_AUTOTUNE="0",
                   HYPOTHESIS_PROFILE="ci")
        return subprocess.call([sys.executable, "-m", "lora_lab.kernels.compile.specializations",
                                *(sys.argv[1:] if argv is None else argv)], env=env)
    results = []
    for group in args.group or GPU_TEST_GROUPS:
        results.append(count(group))
        problems = over_budget(results[-1])
        print(f"{group}: {results[-1]['specializations']} specializations, {results[-1]['launchers']} launchers, "
              f"about {results[-1]['estimated_compile_seconds']:.0f} s of compiling (budget {BUDGET['specializations']}"
              f", {BUDGET['seconds']:.0f} s) {results[-1]['by_kernel']}: {'; '.join(problems) or 'fits'}", flush=True)
        results[-1]["problems"] = problems
    if args.json:
        Path(args.json).write_text(json.dumps({"budget": BUDGET, "groups": results}, indent=1))
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
