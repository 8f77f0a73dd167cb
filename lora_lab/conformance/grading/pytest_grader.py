"""``pytest exercises/``: pytest as the other front end of ``lora-lab grade`` (``exercises/conftest.py`` enables it).

    pytest exercises/                          # every exercise: an item per graded check, then the points table
    pytest exercises/ex04_loss.py              # one exercise
    pytest exercises/ -k loss.matches          # the checks you are fixing; --lf: those that failed last time
    pytest exercises/ --lora-lab-solutions     # the reference solutions, as lora-lab grade --solutions: full marks
    pytest exercises/ --lora-lab-gradescope results.json   # Gradescope's autograder results as well

A learner's test runner (an IDE's test explorer, ``--lf``, ``--junitxml``) is pytest, so the grader is one too. There
is still one grader: each exercise file is a collector and each of its graded checks an item, graded by the code
behind ``lora-lab grade`` (``grade.load_exercise`` and ``grade.grade_check``, in the same isolated ``Processes``).
The file is loaded once per exercise, in the learner's process, never in pytest's: pytest's own collector would import
a file named on the command line, so the hook below puts this one in its place. A check that is not passed fails its
item, "not attempted", "not your code" and "missing" included, and the report is the grader's row: the property,
what went wrong and the hint, no traceback of the suite. The session ends with the grader's points table and
``Score: X/Y`` as the last line. The hypothesis profile is ``--hypothesis-profile`` (``ci`` by default, as in
``lora-lab grade``; ``scored`` draws a fresh secret seed, shown in the header); ``--hypothesis-seed`` fixes one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lora_lab.conformance.grading.exercises import EXERCISES, Exercise, GradedCheck, graded_checks
from lora_lab.conformance.grading.grade import (
    STATUS_WORDS,
    ExerciseReport,
    LoadedExercise,
    Row,
    format_row,
    grade_check,
    load_exercise,
    next_step,
    shown_path,
    to_gradescope,
)
from lora_lab.conformance.registry import PASSED

__all__ = [  # the hooks exercises/conftest.py takes in
    "pytest_addoption", "pytest_configure", "pytest_report_header", "pytest_collect_file", "pytest_collection_finish",
    "pytest_sessionfinish", "pytest_terminal_summary", "pytest_unconfigure",
]

BY_STEM = {exercise.stem: exercise for exercise in EXERCISES}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lora_lab_grade", "lora-lab grade (pytest exercises/)")
    group.addoption("--lora-lab-solutions", action="store_true",
                    help="grade the reference solutions (lora_lab, lora_lab.kernels) instead of the files, as lora-lab "
                    "grade --solutions does")
    group.addoption("--lora-lab-chain", action="store_true",
                    help="grade each exercise with your own earlier pieces where it imports the reference's (grade --chain)")
    group.addoption("--lora-lab-gradescope", metavar="FILE",
                    help="also write the grades as Gradescope's autograder results.json to FILE")


class Grading:
    """The session's grading: one ``Processes`` for every item, the current exercise's load, and the rows so far."""

    def __init__(self, config: pytest.Config) -> None:
        from lora_lab.conformance.judge.profiles import draw_seed

        self.solutions = config.getoption("lora_lab_solutions")
        self.chain = config.getoption("lora_lab_chain")
        self.profile = config.getoption("hypothesis_profile", default=None) or "ci"
        seed = config.getoption("hypothesis_seed", default=None)
        self.seed = int(seed) if seed is not None else draw_seed() if self.profile == "scored" else None
        self.processes = None  # started when the first items are known, not for --collect-only
        self.loaded: LoadedExercise | None = None  # the exercise whose file the learner's process holds now
        self.reports: dict[str, ExerciseReport] = {}  # by exercise id

    def start(self, items: list[CheckItem]) -> None:
        """Start the processes now, without waiting, as ``grade()`` does: they import while pytest runs on."""
        from lora_lab.conformance.grading.processes import Processes
        from lora_lab.conformance.isolation.stack import start_stack

        self.processes = Processes()
        if self.solutions:
            self.processes.prestart_solutions([item.exercise.solution for item in items])
        else:
            self.processes.prestart_learner(items[0].path, items[0].path.parent, self.chain)
        start_stack([item.graded.check for item in items])

    def grade(self, item: CheckItem) -> Row:
        """The item's row: its check run by the grader on the exercise's file (loaded once for its checks in a row)."""
        from lora_lab.conformance.judge.profiles import command_profile

        folder = None if self.solutions else item.path.parent
        loaded = self.loaded
        if loaded is None or loaded.report.exercise != item.exercise or loaded.report.source != self._source(item):
            loaded = self.loaded = load_exercise(item.exercise, folder, self.processes, self.chain)
        with command_profile(self.profile, self.seed):
            row = grade_check(loaded, item.graded)
        report = self.reports.setdefault(item.exercise.id, ExerciseReport(item.exercise, loaded.report.source))
        report.chained = loaded.report.chained
        report.rows.append(row)
        return row

    def _source(self, item: CheckItem) -> str:
        return item.exercise.solution if self.solutions else str(item.path)

    def close(self) -> None:
        if self.processes is not None:
            self.processes.close()
        if "lora_lab.conformance.isolation.stack" in sys.modules:  # the oracles' process served every item
            sys.modules["lora_lab.conformance.isolation.stack"].close_stack()

    def ordered_reports(self) -> list[ExerciseReport]:
        return [self.reports[e.id] for e in EXERCISES if e.id in self.reports]


_GRADING = pytest.StashKey[Grading]()


def pytest_configure(config: pytest.Config) -> None:
    # The checks hand kernels CPU tensors: Triton exercises run under its interpreter, set before the fork server starts.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    config.stash[_GRADING] = Grading(config)
    if not config.option.collectonly:  # an IDE's discovery grades nothing
        from lora_lab.conformance.isolation.process import prepare_for_targets

        prepare_for_targets()  # now, before torch is imported here: the fork server imports it while pytest collects


def pytest_report_header(config: pytest.Config) -> str:
    grading = config.stash[_GRADING]
    what = "the reference solutions" if grading.solutions else "your exercise files"
    seed = f", seed {grading.seed}" if grading.seed is not None else ""
    return f"lora-lab grade: {what}, hypothesis profile {grading.profile}{seed}{', --chain' if grading.chain else ''}"


class NotPassed(Exception):
    """A check the grader did not pass (failed, error, not attempted, not your code, missing); carries its row."""


class CheckItem(pytest.Item):
    """One graded check of one exercise: ``exercises/ex04_loss.py::loss.matches_shift_and_mask``."""

    def __init__(self, *, exercise: Exercise, graded: GradedCheck, **kwargs) -> None:
        super().__init__(**kwargs)
        self.exercise, self.graded = exercise, graded

    def runtest(self) -> None:
        row = self.config.stash[_GRADING].grade(self)
        self.user_properties += [("status", STATUS_WORDS.get(row.status, row.status)), ("points", row.score),
                                 ("max_points", row.graded.points)]  # --junitxml records them
        if row.status != PASSED:
            raise NotPassed(row)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, NotPassed):
            return format_row(excinfo.value.args[0], len(self.name)).lstrip()
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"exercise {self.exercise.id}: {self.name}"


class ExerciseFile(pytest.File):
    """An exercise file as a collector of its graded checks; it never imports the file (the grader's process does)."""

    def __init__(self, *, exercise: Exercise, **kwargs) -> None:
        super().__init__(**kwargs)
        self.exercise = exercise

    def collect(self):
        for graded in graded_checks(self.exercise):
            yield CheckItem.from_parent(self, name=graded.check.name, exercise=self.exercise, graded=graded)


@pytest.hookimpl(wrapper=True)
def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    collectors = yield
    exercise = BY_STEM.get(file_path.stem) if file_path.suffix == ".py" else None
    if exercise is None:
        return collectors
    # A file named on the command line gets pytest's Module collector, which would import it into this process.
    kept = [collector for collector in collectors if not isinstance(collector, pytest.Module)]
    return [*kept, ExerciseFile.from_parent(parent, path=file_path, exercise=exercise)]


def pytest_collection_finish(session: pytest.Session) -> None:
    items = [item for item in session.items if isinstance(item, CheckItem)]
    if items and not session.config.option.collectonly:
        session.config.stash[_GRADING].start(items)


def pytest_sessionfinish(session: pytest.Session) -> None:
    grading = session.config.stash[_GRADING]
    grading.close()
    path = session.config.getoption("lora_lab_gradescope")
    if path and grading.reports:
        from lora_lab.conformance.grading.command import write_json

        write_json(path, to_gradescope(grading.ordered_reports()))


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """The grader's points table (one line a row: the details are in the failures above), and what to do next."""
    grading = config.stash[_GRADING]
    reports = grading.ordered_reports()
    if not reports:
        return
    width = max(len(row.graded.check.name) for report in reports for row in report.rows)
    terminalreporter.section("lora-lab grade")
    for report in reports:
        source = report.source if grading.solutions else shown_path(Path(report.source))
        terminalreporter.write_line(f"{report.exercise.id}  {report.exercise.title}  [{source}]")
        for row in report.rows:
            terminalreporter.write_line(format_row(row, width).splitlines()[0])
        if report.chained:
            terminalreporter.write_line(f"  with --lora-lab-chain: {'; '.join(report.chained)}")
        terminalreporter.write_line(f"  {'':{14 + width}} {report.score:>3}/{report.total:<3} for exercise "
                                    f"{report.exercise.id}\n")
    if not grading.solutions:
        folder = Path(reports[0].source).parent
        advice = next_step(reports, folder, lambda exercise: f"pytest {shown_path(folder / f'{exercise.stem}.py')}")
        if advice:
            terminalreporter.write_line(advice)
    path = config.getoption("lora_lab_gradescope")
    if path:
        terminalreporter.write_line(f"wrote {path}")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """``Score: X/Y`` after pytest's own last line, so that it ends the output as it ends ``lora-lab grade``'s."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    reports = config.stash[_GRADING].ordered_reports()
    if reporter is not None and reports:
        reporter.write_line(f"Score: {sum(r.score for r in reports)}/{sum(r.total for r in reports)}")
