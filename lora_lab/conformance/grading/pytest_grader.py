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
what went wrong and the hint, no traceback of the suite; when a whole folder is graded, an exercise whose file is
not there is "missing" and its points count, as in ``lora-lab grade``. The session ends with the grader's points
table and ``Score: X/Y`` as the last line (under pytest-xdist too). The hypothesis profile is
``--hypothesis-profile`` (``ci`` by default, as in ``lora-lab grade``; ``scored`` draws a fresh secret seed, shown in
the header); ``--hypothesis-seed`` fixes one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lora_lab.conformance.grading.exercises import EXERCISES, Exercise, GradedCheck, graded_checks
from lora_lab.conformance.grading.feedback import MISSING
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
from lora_lab.conformance.isolation import sandbox
from lora_lab.conformance.registry import PASSED

__all__ = [  # the hooks exercises/conftest.py takes in; pytest_configure registers the rest (``Grading``)
    "pytest_addoption", "pytest_configure", "pytest_collect_file", "pytest_runtest_makereport",
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
    """The session's grading, a plugin: one ``Processes`` for every item, the current exercise's load, the table.

    The rows reach the table through the test reports (``pytest_runtest_logreport``), so that under pytest-xdist the
    controller, whose workers grade, still prints the table and the Score line.
    """

    def __init__(self, config: pytest.Config) -> None:
        from lora_lab.conformance.judge.profiles import draw_seed

        self.config = config
        self.solutions = config.getoption("lora_lab_solutions")
        self.chain = config.getoption("lora_lab_chain")
        self.profile = config.getoption("hypothesis_profile", default=None) or "ci"
        seed = config.getoption("hypothesis_seed", default=None)
        if seed is not None and not str(seed).isdigit():  # lora-lab grade --seed takes a whole number too
            raise pytest.UsageError(f"--hypothesis-seed={seed}: grading draws from a whole number seed, e.g. 1234")
        self.seed = int(seed) if seed is not None else draw_seed() if self.profile == "scored" else None
        self.worker = hasattr(config, "workerinput")  # an xdist worker grades; its controller shows the table
        if self.worker:  # every worker draws from the controller's seed, the one its header shows
            self.seed = config.workerinput.get("lora_lab_seed", self.seed)
        self.processes = None  # started as the first exercise file is collected (``prestart``), never for --collect-only
        self.loaded: LoadedExercise | None = None  # the exercise whose file the learner's process holds now
        self.reports: dict[str, ExerciseReport] = {}  # by exercise id
        xdist_controller = getattr(config.option, "dist", "no") != "no" and not self.worker
        self.grades_here = not config.option.collectonly and not xdist_controller  # --collect-only grades nothing
        self.installation = sandbox.InstallationWatch() if self.grades_here else None  # compared after grading
        self.tampered: str | None = None

    def grade(self, item: CheckItem) -> tuple[Row, LoadedExercise]:
        """The item's row: its check run by the grader on the exercise's file (loaded once for its checks in a row)."""
        from lora_lab.conformance.judge.profiles import command_profile

        folder = None if self.solutions else item.file.parent
        source = item.exercise.solution if self.solutions else str(item.file)
        loaded = self.loaded
        if loaded is None or loaded.report.exercise != item.exercise or loaded.report.source != source:
            loaded = self.loaded = load_exercise(item.exercise, folder, self.processes, self.chain)
        with command_profile(self.profile, self.seed):
            return grade_check(loaded, item.graded), loaded

    def ordered_reports(self) -> list[ExerciseReport]:
        return [self.reports[e.id] for e in EXERCISES if e.id in self.reports]

    def pytest_report_header(self) -> str:
        what = "the reference solutions" if self.solutions else "your exercise files"
        seed = f", seed {self.seed}" if self.seed is not None else ""
        return f"lora-lab grade: {what}, hypothesis profile {self.profile}{seed}{', --chain' if self.chain else ''}"

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:  # pytest-xdist's controller, starting a worker
        node.workerinput["lora_lab_seed"] = self.seed

    def prestart(self, exercise: Exercise, file: Path) -> None:
        """Start the process for an exercise file (or its solution) now, without waiting, as ``grade()`` does: the
        first one found imports it while pytest imports the suite and collects."""
        if not self.grades_here:
            return
        from lora_lab.conformance.grading.processes import Processes  # imports torch: not before pytest_configure

        self.processes = self.processes or Processes()
        if self.solutions:
            self.processes.prestart_solutions([exercise.solution])
        elif self.processes.learner is None and file.is_file():
            self.processes.prestart_learner(file, file.parent, self.chain)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Start the oracles' process (peft, transformers) for the checks about to run, without waiting."""
        present = [item for item in session.items if isinstance(item, CheckItem) and (self.solutions or item.file.is_file())]
        if present and self.grades_here:
            from lora_lab.conformance.isolation.stack import start_stack

            start_stack([item.graded.check for item in present])

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        row = getattr(report, "lora_lab_row", None)  # CheckItem.row, set by pytest_runtest_makereport below
        if row is None or self.worker:
            return
        exercise = next(e for e in EXERCISES if e.id == row["exercise"])
        graded = next(g for g in graded_checks(exercise) if g.check.name == row["check"])
        table = self.reports.setdefault(exercise.id, ExerciseReport(exercise, row["source"]))
        table.chained = row["chained"]
        table.rows.append(Row(graded, row["status"], row["detail"], row["seconds"]))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.processes is not None:
            self.processes.close()
        if "lora_lab.conformance.isolation.stack" in sys.modules:  # the oracles' process served every item
            sys.modules["lora_lab.conformance.isolation.stack"].close_stack()
        self.tampered = self.installation.tampered() if self.installation is not None else None
        if self.tampered:  # as lora-lab grade: no score once lora_lab or site-packages changed while grading
            self.config.get_terminal_writer().line(f"lora-lab grade: {self.tampered}; no score", red=True)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
            return
        path = self.config.getoption("lora_lab_gradescope")
        if path and self.reports:
            from lora_lab.conformance.grading.command import write_json

            write_json(path, to_gradescope(self.ordered_reports()))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        """The grader's points table (one line a row: the details are in the failures above), and what to do next."""
        reports = self.ordered_reports()
        if not reports:
            return
        width = max(len(row.graded.check.name) for report in reports for row in report.rows)
        write = terminalreporter.write_line
        terminalreporter.section("lora-lab grade")
        for report in reports:
            file = Path(report.source)
            source = report.source if self.solutions else shown_path(file) if file.is_file() else missing_file_note(file)
            write(f"{report.exercise.id}  {report.exercise.title}  [{source}]")
            for row in report.rows:
                write(format_row(row, width).splitlines()[0])
            if report.chained:
                write(f"  with --lora-lab-chain: {'; '.join(report.chained)}")
            write(f"  {'':{14 + width}} {report.score:>3}/{report.total:<3} for exercise {report.exercise.id}\n")
        if not self.solutions:
            folder = Path(reports[0].source).parent
            advice = next_step(reports, folder, lambda exercise: f"pytest {shown_path(folder / f'{exercise.stem}.py')}")
            if advice:
                write(advice)
        path = self.config.getoption("lora_lab_gradescope")
        if path:
            write(f"wrote {path}")

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self) -> None:
        """``Score: X/Y`` after pytest's own last line, so that it ends the output as it ends ``lora-lab grade``'s."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        reports = self.ordered_reports()
        if reporter is not None and reports and not self.tampered:
            reporter.write_line(f"Score: {sum(r.score for r in reports)}/{sum(r.total for r in reports)}")


_GRADING = pytest.StashKey[Grading]()


def pytest_configure(config: pytest.Config) -> None:
    # The checks hand kernels CPU tensors: Triton exercises run under its interpreter, set before the fork server starts.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    grading = config.stash[_GRADING] = Grading(config)
    config.pluginmanager.register(grading, "lora_lab_grading")
    if grading.grades_here:
        from lora_lab.conformance.isolation.process import prepare_for_targets

        prepare_for_targets()  # now, before torch is imported here: the fork server imports it while pytest collects


class NotPassed(Exception):
    """A check the grader did not pass (failed, error, not attempted, not your code, missing); carries its row."""


class CheckItem(pytest.Item):
    """One graded check of one exercise: ``exercises/ex04_loss.py::loss.matches_shift_and_mask``."""

    def __init__(self, *, exercise: Exercise, graded: GradedCheck, file: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.exercise, self.graded, self.file = exercise, graded, file
        self.row: dict | None = None  # the graded row as plain data: it travels in the report (to xdist's controller)

    def runtest(self) -> None:
        row, loaded = self.config.stash[_GRADING].grade(self)
        self.row = {"exercise": self.exercise.id, "source": loaded.report.source, "chained": loaded.report.chained,
                    "check": self.name, "status": row.status, "detail": row.detail, "seconds": row.seconds}
        self.user_properties += [("status", STATUS_WORDS.get(row.status, row.status)), ("points", row.score),
                                 ("max_points", row.graded.points)]  # --junitxml records them
        if row.status != PASSED:
            raise NotPassed(row)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, NotPassed):
            row = excinfo.value.args[0]
            text = format_row(row, len(self.name)).lstrip()
            return f"{text}  {missing_file_note(self.file)}" if row.status == MISSING and not row.detail else text
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"exercise {self.exercise.id}: {self.name}"


class ExerciseFile(pytest.File):
    """An exercise file as a collector of its graded checks; it never imports the file (the grader's process does).

    ``file`` is the exercise file, there or not; ``path``, where pytest finds this folder's conftest.py, is the
    file itself when it is there and its folder when it is missing.
    """

    def __init__(self, *, exercise: Exercise, file: Path | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.exercise, self.file = exercise, file or self.path

    def collect(self):
        for graded in graded_checks(self.exercise):
            yield CheckItem.from_parent(self, name=graded.check.name, exercise=self.exercise, graded=graded,
                                        file=self.file)


def missing_file_note(file: Path) -> str:
    """What ``lora-lab grade`` says in place of an exercise file that is not there."""
    return f"no {file.name} in {shown_path(file.parent)}: copy it from the lora_lab repository's exercises/"


def missing_exercises(folder: Path, parent: pytest.Collector) -> list[ExerciseFile]:
    """The exercises whose files are not in ``folder``, each a collector whose checks are "missing", as in ``lora-lab
    grade``: their points count in the Score line's total."""
    collectors = []
    for exercise in EXERCISES:
        file = folder / f"{exercise.stem}.py"
        if not file.exists():
            nodeid = f"{parent.nodeid}/{file.name}" if parent.nodeid not in ("", ".") else file.name
            collectors.append(ExerciseFile.from_parent(parent, path=folder, name=file.name, nodeid=nodeid,
                                                       exercise=exercise, file=file))
    return collectors


@pytest.hookimpl(wrapper=True)
def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    collectors = yield
    if file_path.name == "conftest.py" and parent.session.isinitpath(file_path.parent):  # the whole folder is graded
        return [*collectors, *missing_exercises(file_path.parent, parent)]
    exercise = BY_STEM.get(file_path.stem) if file_path.suffix == ".py" else None
    if exercise is None:
        return collectors
    parent.config.stash[_GRADING].prestart(exercise, file_path)
    # A file named on the command line gets pytest's Module collector, which would import it into this process.
    kept = [collector for collector in collectors if not isinstance(collector, pytest.Module)]
    return [*kept, ExerciseFile.from_parent(parent, path=file_path, exercise=exercise)]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if call.when == "call" and isinstance(item, CheckItem) and item.row is not None:
        report.lora_lab_row = item.row  # a plain dict: xdist sends it to the controller with the report
    return report
