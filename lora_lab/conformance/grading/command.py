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
not a gate); 2 for a usage error (no exercises folder, an unknown exercise, a
--json path that cannot be written) and when lora_lab's files or site-packages'
startup hooks changed during grading (no score then); 130 on Ctrl-C. Your files
run in a sandbox (--sandbox; see lora-lab verify --help).
With --solutions, 1 unless the reference scores full marks (that would be a
bug in lora_lab, not yours).

examples:
  lora-lab grade                         # every exercise in ./exercises
  lora-lab grade --only 03               # one exercise (or: python exercises/ex03_qlora_linear.py)
  lora-lab grade --only 01 02 --json runs/grade.json
  lora-lab grade --gradescope /autograder/results/results.json   # in a course's Gradescope autograder
  lora-lab grade --solutions             # the reference solutions (lora_lab, lora_lab.kernels): full marks
  lora-lab grade --chain                 # 02, 03 and 06 use your own earlier pieces, not the reference's
  lora-lab grade --watch --only 03       # grade again on every save, showing only what changed (Ctrl-C ends)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lora_lab import cli
from lora_lab.cli.arguments import output_file_problem
from lora_lab.conformance.grading.exercises import EXERCISES, graded_checks, selected_checks
from lora_lab.conformance.grading.feedback import how_to_start
from lora_lab.conformance.grading.grade import format_row, grade, next_step, shown_path, to_gradescope, to_json
from lora_lab.conformance.isolation import sandbox
from lora_lab.conformance.isolation.process import OUTPUT_ENV, prepare_for_targets
from lora_lab.conformance.judge.profiles import command_threads


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
    parser.add_argument("--gradescope", metavar="FILE", help="also write the grades as Gradescope's autograder "
                        "results.json (a test per check: name, score, max_score, output) to FILE")
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
    parser.add_argument("--verbose", action="store_true",
                        help="also show what your files (and the libraries they call) print while graded, each line "
                        "marked 'target|' on stderr; without it that output is kept out of the table")
    parser.add_argument(
        "--sandbox", choices=sandbox.MODES, default=None,
        help="your files run in a process in new namespaces: auto (default, $LORA_LAB_SANDBOX) uses what this machine "
        "offers, require refuses to grade without every layer, off runs a plain process (see lora-lab verify --help)",
    )


def write_json(path: str, content: dict) -> None:
    """Write grades as JSON (``--json``, ``--gradescope``, pytest's ``--lora-lab-gradescope``), making its folders."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(content, handle, indent=2)


def watch_exercise(folder: Path, exercise_id: str, profile: str, chain: bool, stream=None, authorship: bool = True,
                   **loop) -> int:
    """``--watch``: grade exercise ``exercise_id`` again each time a file in ``folder`` changes (see ``watch.py``)."""
    from lora_lab.conformance.grading.watch import watch

    exercise = next(e for e in EXERCISES if e.id == exercise_id)
    width = max(len(g.check.name) for g in graded_checks(exercise))
    title = f"exercise {exercise_id}, hypothesis profile {profile}{', --chain' if chain else ''}"
    return watch(folder, lambda out: grade(folder, [exercise_id], profile, stream=out, chain=chain,
                                           authorship=authorship)[0],
                 lambda row: format_row(row, width), title, stream=stream, **loop)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    finally:  # the oracles' process (isolation.stack) served every grade of the command, --watch's re-grades too
        if "lora_lab.conformance.isolation.stack" in sys.modules:
            sys.modules["lora_lab.conformance.isolation.stack"].close_stack()


def _run(args: argparse.Namespace) -> int:
    for option, path in (("--json", args.json), ("--gradescope", args.gradescope)):
        if path and (problem := output_file_problem(option, path, "to write the grades into")):
            print(f"lora-lab grade: {problem}", file=sys.stderr)  # before the grading: it would end in a traceback, no Score
            return 2
    sandbox.use(args.sandbox)
    if getattr(args, "verbose", False):  # process.TargetOutput echoes the target's output, marked, when this is set
        os.environ[OUTPUT_ENV] = "1"
    installation = sandbox.InstallationWatch()  # compared after grading: nothing of the learner's may have changed it
    prepare_for_targets()  # before torch is imported: this process and the target's take turns
    try:
        command_threads()  # a bad $LORA_LAB_THREADS is a usage error, before any process starts
    except ValueError as exc:
        print(f"lora-lab grade: {exc}", file=sys.stderr)
        return 2
    # The checks hand kernels CPU tensors, so Triton exercises run under its interpreter, GPU or not; it must be
    # set before any @triton.jit runs. (bitsandbytes' import-time noise is filtered by lora_lab's __init__.)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    folder = None if args.solutions else Path(args.path).resolve()
    if folder is not None and not folder.is_dir():
        print(how_to_start(folder, EXERCISES[0].stem), file=sys.stderr)
        return 2
    if args.watch:
        if folder is None or not args.only or len(args.only) != 1:
            print("lora-lab grade --watch needs one exercise of yours: lora-lab grade --watch --only 03", file=sys.stderr)
            return 2
        return watch_exercise(folder, args.only[0], args.profile, args.chain)
    what = "the reference solutions" if folder is None else shown_path(folder)
    from lora_lab.conformance.judge.profiles import draw_seed

    seed = args.seed if args.seed is not None else draw_seed() if args.profile == "scored" else None
    shown = f", seed {seed}" if seed is not None else ""
    print(f"lora-lab grade: {what}, hypothesis profile {args.profile}{shown}{', --chain' if args.chain else ''}")
    if args.check and not any(selected_checks(e, args.check) for e in EXERCISES if not args.only or e.id in args.only):
        names = ", ".join(g.check.name for e in EXERCISES if not args.only or e.id in args.only for g in graded_checks(e))
        print(f"lora-lab grade: no graded check starts with {', '.join(args.check)}; they are: {names}", file=sys.stderr)
        return 2
    reports = grade(folder, args.only, args.profile, chain=args.chain, seed=seed, checks=args.check)
    tampered = installation.tampered()
    if tampered:  # the graded processes are gone by now: nothing can change the score after this line
        print(f"lora-lab grade: {tampered}; no score", file=sys.stderr)
        return 2
    score, total = sum(r.score for r in reports), sum(r.total for r in reports)
    if args.json:
        write_json(args.json, to_json(reports, args.profile, seed))
        print(f"\nwrote {args.json}")
    if args.gradescope:
        write_json(args.gradescope, to_gradescope(reports))
        print(f"\nwrote {args.gradescope}")
    advice = next_step(reports, folder) if folder is not None else None
    if advice:
        print("\n" + advice)
    print(f"\nScore: {score}/{total}")
    return 1 if folder is None and score < total else 0


def main(argv: list[str] | None = None) -> int:
    """``lora-lab grade`` alone, what ``python exercises/exNN_*.py`` calls: the same usage errors and Ctrl-C's one line."""
    return cli.main(["grade", *(sys.argv[1:] if argv is None else argv)])

if __name__ == "__main__":
    sys.exit(main())
