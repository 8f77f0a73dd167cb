"""Test the verifier against cheaters: every known way to fool ``lora-lab verify`` and ``lora-lab grade`` is rejected.

Each other file here is one hostile submission (the exploits of issue 16, KernelBench's and the gpu-mode
leaderboards', and gpu-mode-style negative controls). Its docstring says what it does, ``REJECTED_BY`` names the
check that must reject it. This process never imports them (several tamper with whatever imports them); their
constants are read from the source. Each runs twice, as a library author's target (``lora-lab verify``) and as a
learner's exercise file (``lora-lab grade``), and must lose that check, with a reason.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_lab.cli import main
from lora_lab.conformance.grading.authorship import not_the_learners
from lora_lab.conformance.grading.exercises import EXERCISES
from lora_lab.conformance.runner import all_checks

HERE = Path(__file__).parent
MUTANTS = HERE.parent / "mutants"
# Exploits that are also plain wrong answers live once, as mutants (tests/mutants: rejected in-process by the check
# they name); here they are rejected again through verify and grade, isolated, like every submission of this folder.
EXPLOIT_MUTANTS = ("adamw_half_no_bias_correction", "qlora_scratch_input", "nf4_cache_by_data_ptr",
                   "qlora_bf16_computed_in_fp16", "qlora_column_major", "qlora_nondeterministic", "qlora_cache_by_prefix",
                   "kernel_backward_ignores_dy_strides")
SUBMISSIONS = sorted([*(p for p in HERE.glob("*.py") if not p.name.startswith(("test_", "_", "conftest"))),
                      *(MUTANTS / f"{name}.py" for name in EXPLOIT_MUTANTS)])
CHECKS = {c.name: c for c in all_checks()}


def constants(path: Path) -> dict:
    """The module-level string constants and the docstring of a submission, read without importing it."""
    tree = ast.parse(path.read_text())
    found = {"__doc__": ast.get_docstring(tree) or ""}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for name in node.targets:
                if isinstance(name, ast.Name):
                    found[name.id] = node.value.value
    if "EXPECTED_FAILURE" in found:  # a mutant names the check that rejects it so
        found.setdefault("REJECTED_BY", found["EXPECTED_FAILURE"])
    return found


def cases():
    for path in SUBMISSIONS:
        info = constants(path)
        if "SCORED_ONLY" in info:  # has a test of its own
            continue
        marks = [pytest.mark.xfail(strict=True, reason=info["NEEDS"])] if "NEEDS" in info else []
        yield pytest.param(path, info, marks=marks, id=path.stem)


@pytest.fixture
def call_limit(monkeypatch):
    """A submission's own per-call time limit (CALL_TIMEOUT), so that a hang costs seconds, not the default minutes."""

    def apply(info: dict) -> None:
        if "CALL_TIMEOUT" in info:
            monkeypatch.setenv("LORA_LAB_CALL_TIMEOUT", info["CALL_TIMEOUT"])

    return apply


def test_every_submission_names_a_check_and_a_reason():
    assert len(SUBMISSIONS) >= 15
    for path in SUBMISSIONS:
        info = constants(path)
        assert info.get("REJECTED_BY") in CHECKS, f"{path.name}: REJECTED_BY names no check ({info.get('REJECTED_BY')})"
        assert len(info["__doc__"]) > 40, f"{path.name}: say in the docstring what the exploit does and why it fails"


@pytest.mark.parametrize("path, info", cases())
def test_verify_rejects(path, info, monkeypatch, capsys, tmp_path, call_limit):
    call_limit(info)
    monkeypatch.syspath_prepend(str(path.parent))
    report = tmp_path / "report.json"
    status = main(["verify", path.stem, "--only", info["REJECTED_BY"], "--json", str(report)])
    out = capsys.readouterr().out
    (result,) = json.loads(report.read_text())["results"]
    assert result["status"] in ("failed", "error") and result["detail"], out
    assert status == 1, f"exit status {status} for a rejected target\n{out}"


@pytest.mark.parametrize("path, info", cases())
def test_grade_rejects(path, info, tmp_path, capsys, call_limit):
    call_limit(info)
    check = CHECKS[info["REJECTED_BY"]]
    exercise = next(e for e in EXERCISES if e.id == check.exercise)
    (tmp_path / f"{exercise.stem}.py").write_text(path.read_text())
    report = tmp_path / "grade.json"
    assert main(["grade", "--only", exercise.id, "--check", check.name, "--path", str(tmp_path), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("Score: "), out
    (graded,) = json.loads(report.read_text())["exercises"]
    row = next(r for r in graded["checks"] if r["check"] == check.name)
    assert row["status"] in rejections(exercise.stem, path) and row["points"] == 0 and row["detail"], out


def rejections(stem: str, path: Path) -> tuple[str, ...]:
    """How grade must reject a submission: a file built on lora_lab's own code is 'not your code' from its source
    (grading/authorship.py) before any check runs; any other must lose the check it names (as in verify, above)."""
    return ("not your code",) if not_the_learners(stem, path.read_text()) else ("failed", "error")


def test_the_target_decides_no_exit_status(tmp_path):
    """atexit_exit_zero calls os._exit(0) at exit: only its own process exits 0; the command exits 1."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    command = "from lora_lab.cli import main; raise SystemExit(main())"
    done = subprocess.run([sys.executable, "-c", command, "verify", "atexit_exit_zero", "--only",
                           "nf4.dequantize_matches_bitsandbytes"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "0 passed, 1 failed" in done.stdout


def test_memorised_table_passes_ci_but_not_a_scored_run(monkeypatch, capsys, tmp_path):
    """Why ``ci`` is for feedback and ``scored`` for scores: a table memorised from ci needs no arithmetic to pass it."""
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("LORA_LAB_TABLE", str(tmp_path / "table.pt"))
    check = ["--only", "qlora.forward_matches_float64"]
    monkeypatch.setenv("LORA_LAB_TABLE_RECORD", "1")
    monkeypatch.setenv("LORA_LAB_SANDBOX", "off")  # recorded before any verification: a sandboxed target writes nothing
    assert main(["verify", "memorised_ci_table", *check]) == 0
    monkeypatch.delenv("LORA_LAB_SANDBOX")
    monkeypatch.setenv("LORA_LAB_TABLE_RECORD", "0")
    assert main(["verify", "memorised_ci_table", *check]) == 0, "replaying the table passes the public profile"
    assert main(["verify", "memorised_ci_table", *check, "--profile", "scored"]) == 1
    out = capsys.readouterr().out
    assert "inputs drawn from seed" in out and "FAIL  qlora.forward_matches_float64" in out
    (tmp_path / "ex03_qlora_linear.py").write_text((HERE / "memorised_ci_table.py").read_text())
    grades = tmp_path / "grade.json"
    main(["grade", "--only", "03", "--path", str(tmp_path), "--profile", "scored", "--json", str(grades)])
    (graded,) = json.loads(grades.read_text())["exercises"]
    row = next(r for r in graded["checks"] if r["check"] == "qlora.forward_matches_float64")
    assert row["status"] in rejections("ex03_qlora_linear", HERE / "memorised_ci_table.py") and row["points"] == 0
    assert json.loads(grades.read_text())["seed"] is not None
