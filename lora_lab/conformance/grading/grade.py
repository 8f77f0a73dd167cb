"""Score the exercises in exercises/ with the conformance suite.

Each exercise file (exercises/ex01_nf4.py ... ex08_triton_forward.py) is loaded
from its path and graded by the checks that teach it: a table per exercise
(check, points, status, and on failure what went wrong and a hint), then the
line ``Score: X/Y``. A stub that still raises NotImplementedError is "not
attempted" and scores 0. Sizes, shapes and dtypes are drawn by hypothesis
(derandomized under the default ``ci`` profile, so a grade is reproducible), and
the checks come from the installed lora_lab, never from files in your folder.

Your files are imported and run only in a separate process: a crash (even a
Triton kernel writing past a buffer) or a hang becomes an "error" row naming
the call, and the Score line and --json always come out. A function imported
from lora_lab itself rather than written (``from lora_lab.nf4 import *``) is
"not your code" and scores 0. ``--profile scored`` draws inputs from a fresh
secret seed that the output records; the default ``ci`` profile is reproducible.

Exit status: 0 whenever grading ran, whatever the score (grading is feedback,
not a gate); 2 for a usage error (no exercises folder, an unknown exercise).
With --solutions, 1 unless the reference scores full marks (that would be a
bug in lora_lab, not yours).

examples:
  lora-lab grade                         # every exercise in ./exercises
  lora-lab grade --only 03               # one exercise (or: python exercises/ex03_qlora_linear.py)
  lora-lab grade --only 01 02 --json runs/grade.json
  lora-lab grade --solutions             # the reference solutions (lora_lab, lora_lab.kernels): full marks
  lora-lab grade --chain                 # 02, 03 and 06 use your own earlier pieces, not the reference's
  lora-lab grade --watch --only 03       # grade again on every save, showing only what changed (Ctrl-C ends)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lora_lab.cli.arguments import output_file_problem
from lora_lab.conformance.errors import TargetCrashed, TargetImportError, TargetTimedOut
from lora_lab.conformance.grading.feedback import MISSING, NOT_YOURS, explain, how_to_start, not_yours_reason
from lora_lab.conformance.isolation.process import prepare_for_targets
from lora_lab.conformance.judge.profiles import command_threads
from lora_lab.conformance.runner import (
    ERROR,
    FAILED,
    NOT_ATTEMPTED,
    NOT_PROVIDED,
    PASSED,
    Check,
    all_checks,
    run_check,
)


@dataclass(frozen=True)
class Exercise:
    id: str  # "01" ... "08": the `exercise` field of the checks that grade it
    stem: str  # file name without .py; starts with "ex" so that one exercise can import another
    title: str
    solution: str  # importable module graded by --solutions: the reference solution
    borrowed: tuple[tuple[str, int], ...] = ()  # (check name, points here) for checks whose `exercise` is another one


EXERCISES = (
    Exercise("01", "ex01_nf4", "NF4: quantize and dequantize", "lora_lab"),
    Exercise("02", "ex02_double_quant", "NF4 double quantization", "lora_lab"),
    Exercise("03", "ex03_qlora_linear", "the QLoRA linear op", "lora_lab"),
    Exercise("04", "ex04_loss", "next-token loss with prompt masking", "lora_lab"),
    Exercise("05", "ex05_adamw", "AdamW by hand", "lora_lab"),
    Exercise("06", "ex06_training_step", "apply QLoRA and train one step", "lora_lab"),
    # The Triton exercises reuse the checks of the ops they accelerate; a kernel is worth more than the torch version.
    Exercise("07", "ex07_triton_dequant", "a Triton NF4 dequantize kernel", "lora_lab.kernels",
             borrowed=(("nf4.dequantize_matches_bitsandbytes", 12),)),
    Exercise("08", "ex08_triton_forward", "the fused Triton QLoRA forward (backward as a stretch)", "lora_lab.kernels",
             borrowed=(("qlora.forward_matches_float64", 15), ("qlora.rejects_bad_input", 3),
                       ("qlora.gradients_match_float64", 12))),
)
STATUS_WORDS = {PASSED: "passed", FAILED: "failed", ERROR: "error", NOT_ATTEMPTED: "not attempted", NOT_PROVIDED: MISSING,
                NOT_YOURS: NOT_YOURS}


@dataclass(frozen=True)
class GradedCheck:
    """One row of an exercise's table: a check of the suite and the points it is worth in this exercise."""

    check: Check
    points: int


def selected_checks(exercise: Exercise, prefixes: list[str] | None) -> list[GradedCheck]:
    """The exercise's graded checks whose names start with one of ``prefixes`` (all of them when None)."""
    return [g for g in graded_checks(exercise) if not prefixes or g.check.name.startswith(tuple(prefixes))]


def graded_checks(exercise: Exercise, checks: list[Check] | None = None) -> list[GradedCheck]:
    """The checks that grade ``exercise``: those whose ``exercise`` field names it, then the borrowed ones."""
    checks = all_checks() if checks is None else checks
    by_name = {c.name: c for c in checks}
    rows = [GradedCheck(c, c.points) for c in checks if c.exercise == exercise.id]
    rows += [GradedCheck(by_name[name], points) for name, points in exercise.borrowed if name in by_name]
    return rows


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


def grade_exercise(
    exercise: Exercise, folder: Path | None, on_row: Callable[[Row], None] = lambda row: None,
    processes=None, chain: bool = False, checks: list[str] | None = None,
) -> ExerciseReport:
    """Run the exercise's checks on the learner's file in ``folder``, or on its reference solution when ``folder`` is None.

    The file (or the solution) is imported and run only in an isolated process (``processes``, an
    ``isolation.Processes``, started here if None).
    With ``chain`` the file's imports of the reference's earlier pieces are rebound to the learner's own
    (``learner_files.chain_to_learner``, in that process); ``report.chained`` says what each name now calls. ``checks``:
    only the checks whose names start with one of these prefixes (``--check``).
    """
    own = processes is None
    from lora_lab.conformance.grading.processes import Processes  # imports torch: not at import time (`grade -h` stays fast)

    processes = processes or Processes()
    target, unusable = None, None  # unusable: (status, detail) for every row when the file cannot be graded
    try:
        if folder is None:
            report, target = ExerciseReport(exercise, exercise.solution), processes.solution(exercise.solution)
        else:
            path = _find_file(folder, exercise)
            report = ExerciseReport(exercise, str(path or folder / f"{exercise.stem}.py"))
            if path is None:
                unusable = (MISSING, "")  # the header already says the file is missing
            else:
                try:
                    target = processes.learner_file(path, folder, chain)
                    report.chained = list(target.hello.get("chained", []))
                except TargetImportError as exc:  # a syntax or import error is the learner's, shown as such
                    unusable = (ERROR, "the file does not import:\n" + exc.info.get("traceback", str(exc)))
                except (TargetCrashed, TargetTimedOut) as exc:
                    unusable = (ERROR, f"the file does not import: {exc}")
        # after --chain: a rebound name is the learner's own
        borrowed = {} if folder is None or target is None else {
            op: origin for op, origin in target.origin.items() if origin["lora_lab"]}
        for graded in selected_checks(exercise, checks):
            start = time.perf_counter()
            not_yours = not_yours_reason(graded.check.requires, borrowed, exercise.stem)
            if unusable:
                status, detail = unusable
            elif not_yours:
                status, detail = NOT_YOURS, not_yours
            else:
                target.last_error = None
                status, detail = explain(run_check(graded.check, target), target.last_error)
            report.rows.append(Row(graded, status, detail, time.perf_counter() - start))
            on_row(report.rows[-1])
    finally:
        if own:
            processes.close()
    return report


def grade(
    folder: Path | None, only: list[str] | None = None, profile: str = "ci", stream=sys.stdout, chain: bool = False,
    seed: int | None = None, checks: list[str] | None = None,
) -> list[ExerciseReport]:
    """Grade the exercises in ``folder`` (or the reference solutions when None), printing tables to ``stream``."""
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
                    f"no {exercise.stem}.py in {_display(folder)}: copy it from the lora_lab repository's exercises/")
                print(f"\n{exercise.id}  {exercise.title}  [{_display(source)}]", file=stream, flush=True)
                report = grade_exercise(exercise, folder, lambda row: print(format_row(row, width), file=stream, flush=True),
                                        processes, chain, checks)
                if report.chained:
                    print(f"  with --chain: {'; '.join(report.chained)}", file=stream)
                print(f"  {'':{14 + width}} {report.score:>3}/{report.total:<3} for exercise {exercise.id}", file=stream)
                reports.append(report)
    finally:
        processes.close()
    return reports


def _display(source: Path | str) -> str:
    if isinstance(source, Path):
        with contextlib.suppress(ValueError):
            return str(source.resolve().relative_to(Path.cwd()))
    return str(source)


def format_row(row: Row, width: int) -> str:
    """One table row; below it, for a failure or error, what went wrong and the check's hint."""
    points = f"{row.score:>3}/{row.graded.points:<3}"
    line = f"  {STATUS_WORDS.get(row.status, row.status):<14}{row.graded.check.name:<{width}} {points} {row.seconds:5.1f}s"
    if row.status == PASSED:
        return line
    if row.status in (NOT_ATTEMPTED, MISSING):
        return f"{line}  {row.detail.splitlines()[0] if row.detail else ''}".rstrip()
    indent = " " * 17  # failed or error: the property, what went wrong, and the hint
    detail = "\n".join(indent + text for text in row.detail.splitlines()[:12])
    return f"{line}  {row.graded.check.description}\n{detail}\n{indent}hint: {row.graded.check.hint}"


def next_step(reports: list[ExerciseReport], folder: Path) -> str | None:
    """What a learner does next: work on the first exercise without full marks, and grade just that one."""
    for report in reports:
        if report.score == report.total:
            continue
        exercise = report.exercise
        command = f"lora-lab grade --only {exercise.id}"
        if folder != Path("exercises").resolve():
            command += f" --path {_display(folder)}"
        if all(row.status == MISSING for row in report.rows):
            return f"Next: exercise {exercise.id}: put {exercise.stem}.py back into {_display(folder)}, then run: {command}"
        wrong = any(row.status in (FAILED, ERROR) for row in report.rows)
        action = "fix what the details and hints above point at" if wrong else "replace a `raise NotImplementedError`"
        return (
            f"Next: exercise {exercise.id}, {exercise.title}. Read the top of {_display(Path(report.source))}, "
            f"{action}, then run: {command}"
        )
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only", nargs="+", metavar="NN", default=None, choices=[e.id for e in EXERCISES], type=lambda n: n.zfill(2),
        help="grade only these exercises (01 ... 08; 3 means 03)",
    )
    parser.add_argument(
        "--check", nargs="+", metavar="NAME", default=None,
        help="grade only the checks whose names start with these (e.g. training.lowers_loss or nf4.): faster feedback "
        "on the one you are fixing",
    )
    parser.add_argument("--path", metavar="DIR", default="exercises", help="the exercises folder (default: ./exercises)")
    parser.add_argument("--json", metavar="FILE", help="also write the grades as JSON to FILE")
    parser.add_argument("--solutions", action="store_true", help="grade the reference solutions (lora_lab for 01-06, "
                        "lora_lab.kernels for 07-08) instead of your files")
    parser.add_argument(
        "--chain", action="store_true",
        help="grade each exercise with your own earlier pieces (your ex01's quantize_nf4 in 02, ...) where it imports "
        "the reference's",
    )
    parser.add_argument("--watch", action="store_true",
                        help="with --only NN: grade, then grade again each time the file changes, showing only what changed")
    parser.add_argument(
        "--profile", choices=("ci", "dev", "thorough", "scored"), default="ci",
        help="hypothesis profile: ci (derandomized, default), dev (2x examples, random), thorough (10x), "
        "scored (ci's examples from a fresh secret seed, recorded in the output: what a course grades with)",
    )
    parser.add_argument("--seed", type=int, default=None, help="draw every check's inputs from this seed")


def watch_exercise(folder: Path, exercise_id: str, profile: str, chain: bool, stream=sys.stdout, **loop) -> int:
    """``--watch``: grade exercise ``exercise_id`` again each time a file in ``folder`` changes (see ``watch.py``)."""
    from lora_lab.conformance.grading.watch import watch

    exercise = next(e for e in EXERCISES if e.id == exercise_id)
    width = max(len(g.check.name) for g in graded_checks(exercise))
    title = f"exercise {exercise_id}, hypothesis profile {profile}{', --chain' if chain else ''}"
    return watch(folder, lambda out: grade(folder, [exercise_id], profile, stream=out, chain=chain)[0],
                 lambda row: format_row(row, width), title, stream=stream, **loop)


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


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    finally:  # the oracles' process (isolation.stack) served every grade of the command, --watch's re-grades too
        if "lora_lab.conformance.isolation.stack" in sys.modules:
            sys.modules["lora_lab.conformance.isolation.stack"].close_stack()


def _run(args: argparse.Namespace) -> int:
    if args.json and (problem := output_file_problem("--json", args.json, "to write the grades into")):
        print(f"lora-lab grade: {problem}", file=sys.stderr)  # before the grading: it would end in a traceback, no Score
        return 2
    prepare_for_targets()  # before torch is imported: this process and the target's take turns
    try:
        command_threads()  # a bad $LORA_LAB_THREADS is a usage error, before any process starts
    except ValueError as exc:
        print(f"lora-lab grade: {exc}", file=sys.stderr)
        return 2
    # The checks hand kernels CPU tensors, so Triton exercises run under its interpreter, GPU or not; it must be
    # set before any @triton.jit runs. bitsandbytes' import-time advice to `pip install kernels` is noise here.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    folder = None if args.solutions else Path(args.path).resolve()
    if folder is not None and not folder.is_dir():
        print(how_to_start(folder, EXERCISES[0].stem), file=sys.stderr)
        return 2
    if args.watch:
        if folder is None or not args.only or len(args.only) != 1:
            print("lora-lab grade --watch needs one exercise of yours: lora-lab grade --watch --only 03", file=sys.stderr)
            return 2
        return watch_exercise(folder, args.only[0], args.profile, args.chain)
    what = "the reference solutions" if folder is None else _display(folder)
    from lora_lab.conformance.judge.profiles import draw_seed

    seed = args.seed if args.seed is not None else draw_seed() if args.profile == "scored" else None
    shown = f", seed {seed}" if seed is not None else ""
    print(f"lora-lab grade: {what}, hypothesis profile {args.profile}{shown}{', --chain' if args.chain else ''}")
    if args.check and not any(selected_checks(e, args.check) for e in EXERCISES if not args.only or e.id in args.only):
        names = ", ".join(g.check.name for e in EXERCISES if not args.only or e.id in args.only for g in graded_checks(e))
        print(f"lora-lab grade: no graded check starts with {', '.join(args.check)}; they are: {names}", file=sys.stderr)
        return 2
    reports = grade(folder, args.only, args.profile, chain=args.chain, seed=seed, checks=args.check)
    score, total = sum(r.score for r in reports), sum(r.total for r in reports)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(to_json(reports, args.profile, seed), handle, indent=2)
        print(f"\nwrote {args.json}")
    advice = next_step(reports, folder) if folder is not None else None
    if advice:
        print("\n" + advice)
    print(f"\nScore: {score}/{total}")
    return 1 if folder is None and score < total else 0


def main(argv: list[str] | None = None) -> int:
    """``lora-lab grade`` without the rest of the CLI: what ``python exercises/exNN_*.py`` calls."""
    parser = argparse.ArgumentParser(
        prog="lora-lab grade", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
