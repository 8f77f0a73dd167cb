"""benchmarks/gpu_check.sh cannot waste the GPU run: its dry run, on this CPU, runs every step that needs no CUDA.

The GPU machine is lent for minutes, once; a script that fails there for a reason
other than the kernels (``import kernels`` finding our folder instead of Hugging
Face's package, no C compiler, a step killed at its cap that leaves no result)
wastes the run. ``--dry-run`` executes the same script here: the startup hook
that maps lora_lab without the repository root on ``sys.path``, the environment
and import checks, the specialization count, a compile, each pytest step's
collection with its junit XML, and one conformance step on the CPU (Triton's
interpreter); the steps that need CUDA write "skipped".
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from lora_lab.kernels.compile.specializations import GPU_TEST_GROUPS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
PYTEST_STEPS = (*GPU_TEST_GROUPS, "test_kernels_autotuned", "memcheck")
CUDA_STEPS = ("test_kernels_autotuned", "conformance_fused", "conformance_dense", "memcheck", "plan", "bench")
STEPS = ("environment", *GPU_TEST_GROUPS, "compile_check", "specializations", "conformance_auto", *CUDA_STEPS)


def dry_run(out: Path, **env: str) -> subprocess.CompletedProcess:
    """The script's dry run with this interpreter, from another folder, without the caller's PYTHONPATH."""
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "HF_HUB_OFFLINE")}
    environment |= {"OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=out.parent, env=environment, capture_output=True,
                          text=True, timeout=300)


def results(out: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in (out / "steps").glob("*.json")}


@pytest.fixture(scope="module")
def passing_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    return dry_run(out), out


def test_dry_run_passes_and_writes_each_steps_result(passing_run):
    done, out = passing_run
    assert done.returncode == 0, done.stdout + done.stderr
    found = results(out)
    assert set(STEPS) <= set(found), f"steps without a result: {set(STEPS) - set(found)}"
    for step in STEPS:
        want = "skipped" if step in CUDA_STEPS else "passed"
        assert found[step]["status"] == want, f"{step}: {found[step]}\n{(out / 'summary.txt').read_text()}"
    for step in PYTEST_STEPS:
        ElementTree.parse(out / f"{step}.xml")  # every pytest step leaves junit XML, even one that cannot run here
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["result"] == "kernel checks passed" and summary["dry_run"] is True
    assert {s["step"] for s in summary["steps"]} >= set(STEPS)
    assert "kernel checks passed (dry run)" in (out / "summary.txt").read_text()


def test_dry_run_imports_hugging_faces_kernels_not_our_folder(passing_run):
    """No repository root on sys.path; lora_lab.kernels is our folder; transformers (and so peft) import."""
    _, out = passing_run
    environment = json.loads((out / "environment.json").read_text())
    assert environment["sys_path_has_repo_root"] is False
    assert environment["lora_lab.kernels"] == str(ROOT / "kernels" / "__init__.py")
    assert environment["lora_lab"] == str(ROOT / "lora_lab" / "__init__.py")
    assert "error" not in environment["transformers"], environment["transformers"]
    if "file" in environment["kernels"]:  # Hugging Face's package is installed: it, not our folder, is `kernels`
        assert Path(environment["kernels"]["file"]).parent != ROOT / "kernels"
    assert environment["HF_HUB_OFFLINE"] == "1" and environment["c_compiler"] and environment["python_h"]
    assert environment["fatal"] == []


def test_dry_run_counts_the_specializations_and_compiles(passing_run):
    _, out = passing_run
    counted = json.loads((out / "specializations.json").read_text())["groups"]
    assert counted and all(group["specializations"] > 0 and not group["problems"] for group in counted)
    compiled = json.loads((out / "compile_check.json").read_text())
    assert compiled and all(not r["problems"] for r in compiled)
    checks = json.loads((out / "conformance_auto.json").read_text())
    assert len(checks) == 2 and all(c["status"] == "passed" for c in checks), checks


def test_a_step_stopped_at_its_cap_still_writes_its_result_and_junit(tmp_path):
    """With every step capped at 1 s, each one that starts ends timed_out, with its result and XML; the run fails."""
    out = tmp_path / "out"
    done = dry_run(out, GPU_CHECK_MAX_STEP_S="1")
    assert done.returncode == 1, done.stdout + done.stderr
    found = results(out)
    for step in (*GPU_TEST_GROUPS, "compile_check", "specializations", "conformance_auto"):
        assert found[step]["status"] == "timed_out", found[step]
        assert found[step]["cap"] == 1
    for step in GPU_TEST_GROUPS:
        suite = ElementTree.parse(out / f"{step}.xml").getroot()
        assert suite.iter("testsuite"), step
    assert "KERNEL CHECKS FAILED" in (out / "summary.txt").read_text()


def test_unknown_argument_is_refused():
    done = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--dry-run" in done.stderr


def test_the_environment_step_refuses_a_shadowing_path_no_compiler_and_a_hub_online(tmp_path):
    """The checks that would have saved issue 27's run: each cause is named, and the step fails (exit 1)."""
    script = re.search(r"cat > \"\$SITE/gpu_environment.py\" <<'EOF'\n(.*?)\nEOF\n", SCRIPT.read_text(), re.S).group(1)
    (tmp_path / "gpu_environment.py").write_text(script)
    environment = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "PYTHONSAFEPATH")}
    environment |= {"PYTHONPATH": str(ROOT), "CC": str(tmp_path / "no-such-cc")}  # the old script's sys.path
    done = subprocess.run([sys.executable, str(tmp_path / "gpu_environment.py"), str(tmp_path / "environment.json"),
                           str(ROOT), "1"], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    fatal = " | ".join(json.loads((tmp_path / "environment.json").read_text())["fatal"])
    assert "repository root is on sys.path" in fatal and "C compiler" in fatal and "HF_HUB_OFFLINE" in fatal, fatal
