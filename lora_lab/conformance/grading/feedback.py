"""A learner's exercise file as the suite sees it: loaded from its path, its stubs and tracebacks told apart.

``lora-lab grade`` has each exercise file loaded by path in the learner's own
process (``child.py``; so one exercise can import another: ``from ex01_nf4
import quantize_nf4``), wrapped so that a stub ends a check at once, and shows
the learner their own traceback lines rather than the suite's or torch's.
"""

from __future__ import annotations

from pathlib import Path

from lora_lab.conformance.errors import GRADER_ERROR
from lora_lab.conformance.registry import ERROR, FAILED, NOT_ATTEMPTED, NOT_PROVIDED, PASSED

MISSING = "missing"  # the exercise file, or the function a check needs, is not there
NOT_YOURS = "not your code"  # the function a check needs is lora_lab's own, imported into the exercise file
GRADER = "grader error"  # the grader's own code raised (errors.raised_by_the_suite): no points, and ours to fix
GRADER_HINT = ("the grader, not your file, raised this; the other rows stand. If your code gave it something odd "
               "(an empty parameter list, a None), that may be the cause, but the grader should have said so.")


def not_yours_reason(requires: tuple[str, ...], borrowed: dict[str, dict], stem: str) -> str | None:
    """Why a check gives no points when an operation it needs is lora_lab's own code, imported into the file."""
    ops = [op for op in requires if op in borrowed]
    if not ops:
        return None
    where = ", ".join(sorted({borrowed[op]["module"] for op in ops}))
    return (f"{', '.join(ops)} in {stem}.py is lora_lab's own reference ({where}), imported rather than written: "
            "these points are for your own implementation")


HOW_TO_START = """lora-lab grade: no exercises folder at {folder}.

The exercises come with the lora_lab repository, in exercises/ (ex01_nf4.py ... ex08_triton_forward.py).
Run lora-lab grade from the repository root, or point to the folder:

    lora-lab grade --path {exercises}

Each file opens with the idea, the spec and stubs that raise NotImplementedError; fill them in and grade
one exercise with `lora-lab grade --only 01`. `lora-lab grade --solutions` grades the reference solutions."""


def how_to_start(folder: Path, first_stem: str) -> str:
    """What to do when there is no exercises folder: where the exercises are (next to this lora_lab, when it runs
    from a checkout, pip install -e .) and how to grade them."""
    candidate = Path(__file__).resolve().parents[2] / "exercises"
    exercises = str(candidate) if (candidate / f"{first_stem}.py").is_file() else "/path/to/lora_lab/exercises"
    return HOW_TO_START.format(folder=folder, exercises=exercises)


def explain(result, error: dict | None) -> tuple[str, str]:
    """``(status, detail)`` for a grade table row from a ``runner.Result``, using what the learner's code raised last
    (``child.Server.describe``): a stub is "not attempted", the learner's own assert an error, a missing function
    "missing", an error of the grader's own code a "grader error"."""
    status, detail = result.status, result.detail
    if status != PASSED and error is not None and "NotImplementedError" in error["bases"]:
        if error["stub"] or error["in_learner_file"]:  # one of the learner's stubs (StubReached ended the check)
            return NOT_ATTEMPTED, error["message"] or "raises NotImplementedError (still a stub)"
        return ERROR, error["traceback"]  # torch or Triton lacks an op: a real error, not a stub
    learner_assert = error is not None and "AssertionError" in error["bases"] and not error["check_failed"]
    if status == FAILED and learner_assert and error["in_learner_file"] and detail == error["message"].strip():
        return ERROR, error["traceback"]  # the learner's own assert, not a property of the suite
    if status == NOT_PROVIDED:
        return MISSING, detail.replace("target has no", "the file defines no")
    if status == ERROR and (detail.startswith(GRADER_ERROR) or f"\n{GRADER_ERROR}" in detail):
        return GRADER, detail  # raised by the suite's own code, here or in the file's process (errors.grader_error)
    return status, detail
