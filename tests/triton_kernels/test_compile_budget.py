"""The GPU test steps compile within their time: the specializations the ``ci`` profile draws are counted and bounded.

On the GPU machine, ``benchmarks/gpu_check.sh`` runs ``test_kernels.py`` in the groups
of ``GPU_TEST_GROUPS``, one pytest process each under a 220 s cap, and almost all of
that time is Triton compiling. A test that draws a new dtype or option, or a group
that grows, would push a step past its cap on the one run there is (and a step
killed at its cap reports nothing about the kernels it did not reach). So here,
without a GPU, every group's kernel launches are recorded as Triton's cache keys
(``lora_lab.kernels.compile.specializations``) and held to ``BUDGET``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lora_lab.kernels.compile.launches import defined_kernels
from lora_lab.kernels.compile.specializations import BUDGET, COMPILE_SECONDS, GPU_TEST_GROUPS, KERNEL_MODULES, TEST_FILE


def test_every_kernel_the_package_defines_is_counted():
    """A kernel missing from KERNEL_MODULES runs for real in the counting process, fails on the CPU, and is dropped
    with the test's verdict: its specializations would go uncounted (the small-M reduction's did). Each kernel is
    recorded from the module that defines it and has an estimated compile time."""
    assert KERNEL_MODULES == defined_kernels()
    assert set(COMPILE_SECONDS) == set(KERNEL_MODULES)
    assert all(seconds["default"] > 0 for seconds in COMPILE_SECONDS.values())


def test_every_group_compiles_within_its_budget(tmp_path):
    out = tmp_path / "specializations.json"
    done = subprocess.run([sys.executable, "-m", "lora_lab.kernels.compile.specializations", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    table = done.stdout[-4000:] + done.stderr[-4000:]
    assert out.exists(), table
    groups = {group["group"]: group for group in json.loads(out.read_text())["groups"]}
    assert set(groups) == set(GPU_TEST_GROUPS), table
    drawn = {kernel for group in groups.values() for kernel in group["by_kernel"]}
    assert drawn == set(KERNEL_MODULES), f"kernels no group launches: {set(KERNEL_MODULES) - drawn}\n{table}"
    for name, group in groups.items():
        assert group["specializations"] > 0, f"{name} recorded no kernel launch:\n{table}"
        assert group["specializations"] <= BUDGET["specializations"], f"{name} compiles too many kernels:\n{table}"
        assert group["estimated_compile_seconds"] <= BUDGET["seconds"], f"{name} compiles for too long:\n{table}"
    assert done.returncode == 0, table

    # Each test of the file (but the autotuned ones, which have a step of their own) is in exactly one group.
    everything = subprocess.run([sys.executable, "-m", "pytest", str(TEST_FILE), "--collect-only", "-q",
                                 "-p", "no:cacheprovider", "-k", "not autotuned"], capture_output=True, text=True,
                                timeout=300, env=dict(os.environ, HYPOTHESIS_PROFILE="ci"))
    collected = sorted(line.split("::", 1)[1] for line in everything.stdout.splitlines() if "::" in line)
    assert collected, everything.stdout + everything.stderr
    grouped = sorted(test for group in groups.values() for test in group["tests"])
    assert grouped == collected, f"tests in no group or in two: {set(collected) ^ set(grouped)}"
