"""Errors of the grader's own code are the grader's (#26 item 5): told apart from the learner's by their traceback.

An exception whose traceback leaves the libraries (Python's, torch's) at a frame of ``lora_lab/conformance/`` was
raised by the suite's own code: its row says "grader error", names the suite's line and asks for a report, with no
hint sending the learner to look for a bug in their file. One that leaves them at the learner's frame, or at the
frame through which the target's process calls the target, stays the learner's error.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from test_grade import write_exercise
from test_grade_mistakes import TRAINING_BY_HAND

from lora_lab.conformance.errors import GRADER_ERROR, raised_by_the_suite, user_traceback
from lora_lab.conformance.grading.exercises import EXERCISES, selected_checks
from lora_lab.conformance.grading.feedback import GRADER, GRADER_HINT, explain
from lora_lab.conformance.grading.grade import Row, format_row, grade
from lora_lab.conformance.registry import ERROR
from lora_lab.conformance.runner import Result, all_checks

SUITE_FILE = str(Path(__file__).resolve().parents[2] / "lora_lab" / "conformance" / "judge" / "made_up.py")


def _raised_from(filename: str, body: str = "torch.optim.AdamW([])", **names) -> BaseException:
    """The exception of ``body`` run in a function whose code says it lives in ``filename``."""
    namespace = {"torch": torch, **names}
    source = f"def call():\n    try:\n        {body}\n    except Exception as exc:\n        return exc\n"
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - a fixed test string
    exc = namespace["call"]()  # caught in that function, as the runner catches in its own: the traceback starts there
    assert exc is not None, f"{body} did not raise"
    return exc


def test_an_error_raised_through_torch_by_the_suites_code_is_the_graders():
    exc = _raised_from(SUITE_FILE)
    assert raised_by_the_suite(exc)
    detail = user_traceback(exc)
    assert detail.startswith(f"{GRADER_ERROR}: ValueError: optimizer got an empty parameter list")
    assert "lora_lab/conformance/judge/made_up.py:3 (call)" in detail and "report" in detail


def test_an_error_raised_through_torch_by_the_learners_code_is_the_learners(tmp_path):
    exc = _raised_from(str(tmp_path / "ex06_training_step.py"))
    assert not raised_by_the_suite(exc)
    assert not user_traceback(exc).startswith(GRADER_ERROR)


def test_an_error_behind_the_call_boundary_of_the_targets_process_is_the_targets():
    """The target's process calls the target through a frame named <call> (probes.invoke): what lies beyond it, a
    library target's own frames in site-packages included, is the target's."""
    assert not raised_by_the_suite(_raised_from("<call>"))


def test_an_error_of_autograd_running_the_targets_graph_is_not_the_graders():
    """The suite takes the backward, but the graph is the target's: an in-place write to a tensor saved for backward
    is the target's mistake, though no frame of the target's is on the stack when autograd finds it."""
    z = torch.ones(2, requires_grad=True).exp()
    z.mul_(2)  # exp saved its output for backward
    exc = _raised_from(SUITE_FILE, "z.sum().backward()", z=z)
    assert "inplace" in str(exc) and not raised_by_the_suite(exc)


def test_a_grader_error_row_has_its_own_status_and_no_hint_about_the_learners_code():
    check = next(c for c in all_checks() if c.name == "training.matches_reference")
    detail = user_traceback(_raised_from(SUITE_FILE))
    status, shown = explain(Result(check, ERROR, f"on the drawn input x=1\n{detail}"), None)
    assert (status, shown.splitlines()[1]) == (GRADER, detail.splitlines()[0])
    graded = next(g for e in EXERCISES for g in selected_checks(e, [check.name]))
    text = format_row(Row(graded, status, shown, 0.1), 40)
    assert text.lstrip().startswith("grader error") and f"hint: {GRADER_HINT}" in text and check.hint not in text


def test_grade_names_the_graders_own_error_for_a_model_with_nothing_to_train(tmp_path):
    """Everything frozen after the swap: the suite's own make_optimizer gets no parameter (before: an 'error' row
    showing torch's lines as if they were the learner's)."""
    frozen = TRAINING_BY_HAND.replace("    checkpointing = getattr(model,", "    for parameter in model.parameters():\n"
                                      "        parameter.requires_grad_(False)\n    checkpointing = getattr(model,")
    write_exercise(tmp_path, "ex06_training_step", frozen)
    (report,) = grade(tmp_path, ["06"], checks=["training.matches_reference"], authorship=False, stream=io.StringIO())
    (row,) = report.rows
    assert row.status == GRADER and "optimizer got an empty parameter list" in row.detail, row.detail
    assert "model_protocol.py" in row.detail and row.score == 0
