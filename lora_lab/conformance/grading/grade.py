"""Grading: each exercise's checks run on the learner's file (or its reference solution), one table per exercise.

A row per check (status, points, seconds; for a failure what went wrong and the check's hint), the exercise's score,
and what to do next (``next_step``). The command around it is ``command.py``; the exercise table ``exercises.py``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_lab.conformance.errors import TargetCrashed, TargetImportError, TargetTimedOut
from lora_lab.conformance.grading.authorship import not_the_learners
from lora_lab.conformance.grading.exercises import EXERCISES, Exercise, GradedCheck, selected_checks
from lora_lab.conformance.grading.feedback import GRADER, GRADER_HINT, MISSING, NOT_YOURS, explain, not_yours_reason
from lora_lab.conformance.runner import (
    ERROR,
    FAILED,
    NOT_ATTEMPTED,
    NOT_PROVIDED,
    PASSED,
    run_check,
)

STATUS_WORDS = {PASSED: "passed", FAILED: "failed", ERROR: "error", NOT_ATTEMPTED: "not attempted", NOT_PROVIDED: MISSING,
                NOT_YOURS: NOT_YOURS, GRADER: GRADER}


@dataclass
class Row:
    graded: GradedCheck
    status: str
    detail: str
    seconds: float

    @property
    def score(self) -> int:
        return self.graded.points if self.status == PASSED else 0


@dataclass
class ExerciseReport:
    exercise: Exercise
    source: str  # the file graded, or the module with --solutions
    rows: list[Row] = field(default_factory=list)
    chained: list[str] = field(default_factory=list)  # with --chain: what the file's reference imports now call

    @property
    def score(self) -> int:
        return sum(r.score for r in self.rows)

    @property
    def total(self) -> int:
        return sum(r.graded.points for r in self.rows)


def _find_file(folder: Path, exercise: Exercise) -> Path | None:
    path = folder / f"{exercise.stem}.py"
    return path if path.is_file() else None


@dataclass
class LoadedExercise:
    """An exercise's file (or reference solution) loaded in its isolated process, ready to be graded check by check.

    ``grade_exercise`` grades all of an exercise's checks on one load; pytest's front end (``pytest_grader``) one check
    per item, on the same load, so both run the same checks on the same module state.
    """

    report: ExerciseReport
    target: Any = None  # the isolated target (``proxy.RemoteTarget``); None when the file cannot be graded
    unusable: tuple[str, str] | None = None  # (status, detail) for every row when the file cannot be graded
    borrowed: dict = field(default_factory=dict)  # operation -> origin, for the functions that are lora_lab's own


def load_exercise(exercise: Exercise, folder: Path | None, processes, chain: bool = False,
                  authorship: bool = True) -> LoadedExercise:
    """Load the learner's file in ``folder`` (the reference solution when None) into its process in ``processes``.

    With ``chain`` the file's imports of the reference's earlier pieces are rebound to the learner's own
    (``learner_files.chain_to_learner``, in that process); ``report.chained`` says what each name now calls.
    """
    if folder is None:
        return LoadedExercise(ExerciseReport(exercise, exercise.solution), processes.solution(exercise.solution))
    path = _find_file(folder, exercise)
    loaded = LoadedExercise(ExerciseReport(exercise, str(path or folder / f"{exercise.stem}.py")))
    if path is None:
        loaded.unusable = (MISSING, "")  # the header already says the file is missing
        return loaded
    # read here, before anything runs; ``authorship=False`` only for the suite's own tests of what the checks catch,
    # whose one-edit mistakes are lora_lab's reference with one line changed
    borrowed = not_the_learners(exercise.stem, path.read_text(errors="replace")) if authorship else None
    if borrowed:
        loaded.unusable = (NOT_YOURS, f"{path.name}: {borrowed}")
        return loaded
    try:
        loaded.target = processes.learner_file(path, folder, chain)
        loaded.report.chained = list(loaded.target.hello.get("chained", []))
    except TargetImportError as exc:  # a syntax or import error is the learner's, shown as such
        loaded.unusable = (ERROR, "the file does not import:\n" + exc.info.get("traceback", str(exc)))
    except (TargetCrashed, TargetTimedOut) as exc:
        loaded.unusable = (ERROR, f"the file does not import: {exc}")
    else:  # after --chain: a rebound name is the learner's own
        loaded.borrowed = {op: origin for op, origin in loaded.target.origin.items() if origin["lora_lab"]}
    return loaded


def grade_check(loaded: LoadedExercise, graded: GradedCheck) -> Row:
    """One row: ``graded``'s check run on the loaded file through the suite (``run_check``), with the grader's status."""
    start = time.perf_counter()
    not_yours = not_yours_reason(graded.check.requires, loaded.borrowed, loaded.report.exercise.stem)
    if loaded.unusable:
        status, detail = loaded.unusable
    elif not_yours:
        status, detail = NOT_YOURS, not_yours
    else:
        loaded.target.last_error = None
        status, detail = explain(run_check(graded.check, loaded.target), loaded.target.last_error)
    return Row(graded, status, detail, time.perf_counter() - start)


def grade_exercise(
    exercise: Exercise, folder: Path | None, on_row: Callable[[Row], None] = lambda row: None,
    processes=None, chain: bool = False, checks: list[str] | None = None, authorship: bool = True,
) -> ExerciseReport:
    """Run the exercise's checks on the learner's file in ``folder``, or on its reference solution when ``folder`` is None.

    The file (or the solution) is imported and run only in an isolated process (``processes``, an
    ``isolation.Processes``, started here if None); ``chain`` as in ``load_exercise``. ``checks``: only the checks
    whose names start with one of these prefixes (``--check``).
    """
    own = processes is None
    from lora_lab.conformance.grading.processes import Processes  # imports torch: not at import time (`grade -h` stays fast)

    processes = processes or Processes()
    try:
        loaded = load_exercise(exercise, folder, processes, chain, authorship)
        for graded in selected_checks(exercise, checks):
            loaded.report.rows.append(grade_check(loaded, graded))
            on_row(loaded.report.rows[-1])
    finally:
        if own:
            processes.close()
    return loaded.report


def grade(
    folder: Path | None, only: list[str] | None = None, profile: str = "ci", stream=None, chain: bool = False,
    seed: int | None = None, checks: list[str] | None = None, authorship: bool = True,
) -> list[ExerciseReport]:
    """Grade the exercises in ``folder`` (or the reference solutions when None), printing tables to ``stream``
    (``sys.stdout`` as it is at the call: pytest's capture replaces it between tests)."""
    stream = stream if stream is not None else sys.stdout
    folder = folder.resolve() if folder is not None else None
    from lora_lab.conformance.grading.processes import Processes

    processes = Processes()  # started first: the targets import in their processes while this one imports the suite
    first = [e for e in EXERCISES if not only or e.id in only]
    if folder is None:
        processes.prestart_solutions([e.solution for e in first])
    elif first and _find_file(folder, first[0]):
        processes.prestart_learner(_find_file(folder, first[0]), folder, chain)
    exercises = [e for e in first if selected_checks(e, checks)]
    from lora_lab.conformance.isolation.stack import start_stack

    # the oracles' libraries import there meanwhile; the process serves every later grade too (run closes it)
    start_stack([g.check for e in exercises for g in selected_checks(e, checks)])
    width = max((len(g.check.name) for e in exercises for g in selected_checks(e, checks)), default=20)
    reports = []
    from lora_lab.conformance.judge.profiles import command_profile

    try:
        with command_profile(profile, seed):
            for exercise in exercises:
                source = exercise.solution if folder is None else _find_file(folder, exercise) or (
                    f"no {exercise.stem}.py in {shown_path(folder)}: copy it from the lora_lab repository's exercises/")
                print(f"\n{exercise.id}  {exercise.title}  [{shown_path(source)}]", file=stream, flush=True)
                report = grade_exercise(exercise, folder, lambda row: print(format_row(row, width), file=stream, flush=True),
                                        processes, chain, checks, authorship)
                if report.chained:
                    print(f"  with --chain: {'; '.join(report.chained)}", file=stream)
                print(f"  {'':{14 + width}} {report.score:>3}/{report.total:<3} for exercise {exercise.id}", file=stream)
                reports.append(report)
    finally:
        processes.close()
    return reports


def shown_path(source: Path | str) -> str:
    if isinstance(source, Path):
        with contextlib.suppress(ValueError):
            return str(source.resolve().relative_to(Path.cwd()))
    return str(source)


def format_row(row: Row, width: int) -> str:
    """One table row; below it, for a failure or error, what went wrong and the check's hint."""
    points = f"{row.score:>3}/{row.graded.points:<3}"
    line = f"  {STATUS_WORDS.get(row.status, row.status):<14}{row.graded.check.name:<{width}} {points} {row.seconds:5.1f}s"
    if row.status == PASSED:  # with a passed check's hint under it (a kernel that compiles but spills registers)
        return line + "".join(f"\n{' ' * 17}{text}" for text in row.detail.splitlines() if text.startswith("hint: "))
    if row.status in (NOT_ATTEMPTED, MISSING):
        return f"{line}  {row.detail.splitlines()[0] if row.detail else ''}".rstrip()
    indent = " " * 17  # failed or error: the property, what went wrong, and the hint
    detail = "\n".join(indent + text for text in row.detail.splitlines()[:12])
    hint = GRADER_HINT if row.status == GRADER else row.graded.check.hint  # the check's hint is about the learner's code
    return f"{line}  {row.graded.check.description}\n{detail}\n{indent}hint: {hint}"


def next_step(reports: list[ExerciseReport], folder: Path, rerun: Callable[[Exercise], str] | None = None) -> str | None:
    """What a learner does next: work on the first exercise without full marks, and grade just that one.

    ``rerun(exercise)`` is the command that grades just that one, in the front end's words (pytest's: its file).
    """
    for report in reports:
        if report.score == report.total:
            continue
        exercise = report.exercise
        if rerun is not None:
            command = rerun(exercise)
        else:
            command = f"lora-lab grade --only {exercise.id}"
            if folder != Path("exercises").resolve():
                command += f" --path {shown_path(folder)}"
        if all(row.status == MISSING for row in report.rows):
            return f"Next: exercise {exercise.id}: put {exercise.stem}.py back into {shown_path(folder)}, then run: {command}"
        wrong = any(row.status in (FAILED, ERROR) for row in report.rows)
        action = "fix what the details and hints above point at" if wrong else "replace a `raise NotImplementedError`"
        return (
            f"Next: exercise {exercise.id}, {exercise.title}. Read the top of {shown_path(Path(report.source))}, "
            f"{action}, then run: {command}"
        )
    return None


def to_json(reports: list[ExerciseReport], profile: str, seed: int | None = None) -> dict:
    def check_json(row: Row) -> dict:
        return {"check": row.graded.check.name, "points": row.score, "max_points": row.graded.points,
                "status": STATUS_WORDS.get(row.status, row.status), "detail": row.detail, "hint": row.graded.check.hint,
                "seconds": round(row.seconds, 3)}

    def sha256(source: str) -> str | None:
        from lora_lab.conformance.isolation.origin import sha256_of

        return sha256_of([Path(source)]) if Path(source).is_file() else None

    exercises = [{"id": r.exercise.id, "title": r.exercise.title, "source": r.source, "sha256": sha256(r.source),
                  "score": r.score, "total": r.total, "chained": r.chained, "checks": [check_json(row) for row in r.rows]}
                 for r in reports]
    return {"profile": profile, "seed": seed, "isolated": True, "score": sum(r.score for r in reports),
            "total": sum(r.total for r in reports), "exercises": exercises}



def to_gradescope(reports: list[ExerciseReport]) -> dict:
    """The grades as Gradescope's autograder ``results.json``: a test per check (name, score, max_score, output).

    A course runs the kit in its own autograding container and copies this to /autograder/results/results.json;
    ``output`` is the row the learner would see (what went wrong and the hint), ``status`` passed or failed.
    """
    tests = [{"name": f"{r.exercise.id} {row.graded.check.name}", "score": row.score, "max_score": row.graded.points,
              "status": "passed" if row.status == PASSED else "failed",
              "output": format_row(row, len(row.graded.check.name)).strip()}
             for r in reports for row in r.rows]
    score, total = sum(r.score for r in reports), sum(r.total for r in reports)
    return {"score": score, "output": f"Score: {score}/{total}", "tests": tests}
