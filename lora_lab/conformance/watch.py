"""``lora-lab grade --watch --only NN``: grade one exercise again each time its file changes, showing what changed.

A learner edits, saves and looks: the first run prints the whole table, every
later run prints only the rows whose status or points changed (with their
details and hints) and the new score, or a line saying nothing changed. The
exercises folder is polled (every ``*.py`` in it, so an edit to an earlier
exercise that this one imports counts too); no extra dependency is needed.
"""

from __future__ import annotations

import hashlib
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lora_lab.conformance.grade import EXERCISES, ExerciseReport, format_row, grade, graded_checks


def folder_fingerprint(folder: Path) -> str:
    """A hash of every ``*.py`` file in ``folder``: names and contents (an editor's save changes it)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode())
        try:
            digest.update(path.read_bytes())
        except OSError:  # removed between the listing and the read: the next poll sees it
            continue
    return digest.hexdigest()


def changed_rows(before: ExerciseReport | None, after: ExerciseReport) -> list:
    """Rows of ``after`` whose status, points or first detail line differ from ``before`` (all rows when it is None)."""
    if before is None:
        return list(after.rows)
    previous = {row.graded.check.name: row for row in before.rows}

    def key(row):
        return row.status, row.score, (row.detail.splitlines() or [""])[0]

    return [row for row in after.rows if row.graded.check.name not in previous
            or key(previous[row.graded.check.name]) != key(row)]


def watch(
    folder: Path, exercise_id: str, profile: str = "ci", chain: bool = False, stream=sys.stdout,
    runs: int | None = None, poll_seconds: float = 0.5, wait: Callable[[float], None] = time.sleep,
) -> int:
    """Grade exercise ``exercise_id`` in ``folder`` now and after every change; ``runs`` bounds the gradings (tests).

    Returns 0 (grading is feedback); Ctrl-C ends the loop.
    """
    exercise = next(e for e in EXERCISES if e.id == exercise_id)
    width = max(len(g.check.name) for g in graded_checks(exercise))
    last: ExerciseReport | None = None
    fingerprint, done = None, 0
    print(f"lora-lab grade --watch: exercise {exercise_id} in {folder}, hypothesis profile {profile} (Ctrl-C ends)",
          file=stream, flush=True)
    try:
        while runs is None or done < runs:
            current = folder_fingerprint(folder)
            if current == fingerprint:
                wait(poll_seconds)
                continue
            fingerprint = current
            quiet = io.StringIO()
            (report,) = grade(folder, [exercise_id], profile, stream=quiet if last is not None else stream, chain=chain)
            done += 1
            if last is not None:
                rows = changed_rows(last, report)
                stamp = time.strftime("%H:%M:%S")
                if not rows:
                    print(f"\n[{stamp}] {exercise.stem}.py changed; no check changed: {report.score}/{report.total}",
                          file=stream, flush=True)
                else:
                    print(f"\n[{stamp}] changed since the last run ({last.score} -> {report.score}/{report.total}):",
                          file=stream)
                    for row in rows:
                        print(format_row(row, width), file=stream)
                    stream.flush()
            last = report
    except KeyboardInterrupt:
        print("\nstopped watching", file=stream)
    return 0
