"""``pytest exercises/`` is the grader: the same checks, statuses and points as ``lora-lab grade``, ending in ``Score:``.

Each test runs pytest in a fresh process on the repository's exercises/ or on a folder of exercise files in
``tmp_path`` (with exercises/' conftest.py and pytest.ini), as a learner or a course's autograder would. Only
exercise 05 is graded: its checks take a second.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

from lora_lab.conformance.grading.command import main
from lora_lab.conformance.grading.exercises import EXERCISES, graded_checks
from lora_lab.conformance.grading.grade import STATUS_WORDS, grade

ROOT = Path(__file__).resolve().parents[2]
EXERCISES_DIR = ROOT / "exercises"

# Adam with L2 (test_grade.py's mistake): loses adamw.matches_torch (10 points), keeps first_step_moves_by_lr (5).
# It refuses to be imported into pytest's process: the grader loads it only in the learner's own.
ADAM_WITH_L2 = '''
import sys

assert "_pytest" not in sys.modules, "an exercise file was imported into pytest's process"

import torch


@torch.no_grad()
def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    beta1, beta2 = betas
    grad = grad + weight_decay * param  # the mistake: L2 added to the gradient, not decoupled decay
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
'''


def run_pytest(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_ADDOPTS"}
    return subprocess.run([sys.executable, "-m", "pytest", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=env)


def exercises_folder(path: Path, files: dict[str, str]) -> Path:
    """A learner's exercises folder: exercises/' conftest.py and pytest.ini, and ``files`` (stem: source)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("conftest.py", "pytest.ini"):
        shutil.copy(EXERCISES_DIR / name, path / name)
    for stem, source in files.items():
        (path / f"{stem}.py").write_text(textwrap.dedent(source))
    return path


def junit_properties(case: ET.Element) -> dict[str, str]:
    """The grader's row as --junitxml records it: status, points and max_points."""
    return {prop.get("name"): prop.get("value") for prop in case.iter("property")}


def last_line(done: subprocess.CompletedProcess) -> str:
    return done.stdout.rstrip().splitlines()[-1]


def test_untouched_stubs_fail_as_not_attempted_and_end_with_score_zero(tmp_path):
    junit, gradescope = tmp_path / "junit.xml", tmp_path / "results" / "results.json"
    done = run_pytest("exercises/ex05_adamw.py", "-p", "no:cacheprovider", "--junitxml", str(junit),
                      "--lora-lab-gradescope", str(gradescope))
    assert done.returncode == 1, done.stdout + done.stderr
    assert last_line(done) == "Score: 0/15", done.stdout
    assert "2 failed" in done.stdout and "not attempted adamw.matches_torch" in done.stdout
    assert "Next: exercise 05" in done.stdout and "then run: pytest exercises/ex05_adamw.py" in done.stdout
    cases = ET.parse(junit).getroot().iter("testcase")
    recorded = {case.get("name"): (junit_properties(case), case.find("failure") is not None) for case in cases}
    assert recorded == {
        "adamw.matches_torch": ({"status": "not attempted", "points": "0", "max_points": "10"}, True),
        "adamw.first_step_moves_by_lr": ({"status": "not attempted", "points": "0", "max_points": "5"}, True),
    }
    results = json.loads(gradescope.read_text())
    assert results["score"] == 0 and [(t["name"], t["score"], t["max_score"], t["status"]) for t in results["tests"]] == [
        ("05 adamw.matches_torch", 0, 10, "failed"), ("05 adamw.first_step_moves_by_lr", 0, 5, "failed")]
    assert all("exercise 05: write adamw_step" in test["output"] for test in results["tests"])
    by_command = tmp_path / "by_command.json"  # lora-lab grade --gradescope writes the same results
    assert main(["--only", "05", "--path", str(EXERCISES_DIR), "--gradescope", str(by_command)]) == 0
    assert [{**t, "output": None} for t in json.loads(by_command.read_text())["tests"]] == [
        {**t, "output": None} for t in results["tests"]]  # the outputs differ only in the seconds


def test_the_reference_solutions_score_full_marks():
    done = run_pytest("exercises/ex05_adamw.py", "-p", "no:cacheprovider", "--lora-lab-solutions")
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout + done.stderr
    assert last_line(done) == "Score: 15/15"


def test_pytest_and_lora_lab_grade_give_the_same_points_on_the_same_files(tmp_path):
    """One grader, two front ends: a partly right ex05, graded both ways."""
    folder = exercises_folder(tmp_path / "exercises", {"ex05_adamw": ADAM_WITH_L2})
    junit = tmp_path / "junit.xml"
    done = run_pytest("ex05_adamw.py", "--junitxml", str(junit), cwd=folder)
    assert last_line(done) == "Score: 5/15", done.stdout + done.stderr
    by_pytest = {case.get("name"): junit_properties(case) for case in ET.parse(junit).getroot().iter("testcase")}
    reports = grade(folder, ["05"], "ci", stream=io.StringIO())
    by_grade = {row.graded.check.name: {"status": STATUS_WORDS[row.status], "points": str(row.score),
                                        "max_points": str(row.graded.points)} for r in reports for row in r.rows}
    assert by_pytest == by_grade
    assert by_grade["adamw.matches_torch"]["status"] == "failed" and by_grade["adamw.first_step_moves_by_lr"]["points"] == "5"
    # the failure shows the grader's row: what went wrong and the check's hint, not a traceback of the suite
    assert "hint: " in done.stdout and "Traceback" not in done.stdout

    rerun = run_pytest("--lf", cwd=folder)  # pytest's cache, in the folder's own root, remembers the failure
    summary = rerun.stdout.rstrip().splitlines()[-2]  # pytest's own last line, before Score
    assert "rerun previous 1 failure" in rerun.stdout and " 1 failed" in summary and "passed" not in summary, rerun.stdout
    assert last_line(rerun) == "Score: 0/10"


def test_not_your_code_and_missing_files_fail_and_k_selects_checks(tmp_path):
    """A folder holding only an ex05 that re-exports lora_lab's adamw_step, graded whole, as ``pytest`` in it does."""
    folder = exercises_folder(tmp_path, {"ex05_adamw": "from lora_lab.optim import adamw_step  # noqa: F401\n"})
    done = run_pytest("-p", "no:cacheprovider", "-k", "first_step or ex01_nf4", cwd=folder)
    graded = sum(len(graded_checks(exercise)) for exercise in EXERCISES)  # one test per graded check
    assert f"collected {graded} items / {graded - 8} deselected / 8 selected" in done.stdout, done.stdout + done.stderr
    assert f"8 failed, {graded - 8} deselected" in done.stdout
    assert "not your code adamw.first_step_moves_by_lr" in done.stdout
    assert "it imports adamw_step from lora_lab.optim, lora_lab's own code" in done.stdout
    assert "missing       nf4.bytes_match_bitsandbytes" in done.stdout  # as in lora-lab grade, 01's points count
    assert "no ex01_nf4.py in .: copy it from the lora_lab repository's exercises/" in done.stdout
    assert last_line(done) == "Score: 0/45"


def test_the_repository_test_run_does_not_collect_the_exercises():
    done = run_pytest("--collect-only", "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not [line for line in done.stdout.splitlines() if line.startswith("exercises/")]
