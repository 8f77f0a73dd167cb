"""``lora-lab grade --watch --only NN``: grade one exercise again each time its file changes, showing what changed.

A learner edits, saves and looks: the first run prints the whole table, every
later run prints only the rows whose status or points changed (with their
details and hints) and the new score, or a line saying nothing changed. The
exercises folder is polled (every ``*.py`` in it, so an edit to an earlier
exercise that this one imports counts too); no extra dependency is needed.

``grade.py`` hands in the grading and the row formatting, so this module never
imports it back (the import graph stays a tree).
"""

from __future__ import annotations

import hashlib
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO


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


def changed_rows(before: Any | None, after: Any) -> list:
    """Rows of ``after`` whose status, points or first detail line differ from ``before`` (all rows when it is None)."""
    if before is None:
        return list(after.rows)
    previous = {row.graded.check.name: row for row in before.rows}

    def key(row):
        return row.status, row.score, (row.detail.splitlines() or [""])[0]

    return [row for row in after.rows if row.graded.check.name not in previous
            or key(previous[row.graded.check.name]) != key(row)]


def watch(
    folder: Path, grade_once: Callable[[TextIO], Any], format_row: Callable[[Any], str], title: str,
    stream=None, runs: int | None = None, poll_seconds: float = 0.5, wait: Callable[[float], None] = time.sleep,
) -> int:
    """Grade with ``grade_once(stream)`` now and after every change in ``folder``; ``runs`` bounds the gradings (tests).

    ``grade_once`` prints its table to the stream it is given (``sys.stdout`` at the call when None) and returns the
    exercise's report; ``format_row`` is ``grade.format_row`` at the table's width. Returns 0 (grading is feedback);
    Ctrl-C ends the loop.
    """
    stream = stream if stream is not None else sys.stdout
    last = None
    fingerprint, done = None, 0
    print(f"lora-lab grade --watch: {title} in {folder} (Ctrl-C ends)", file=stream, flush=True)
    try:
        while runs is None or done < runs:
            current = folder_fingerprint(folder)
            if current == fingerprint:
                wait(poll_seconds)
                continue
            fingerprint = current
            report = grade_once(io.StringIO() if last is not None else stream)
            done += 1
            if last is not None:
                rows = changed_rows(last, report)
                stamp = time.strftime("%H:%M:%S")
                if not rows:
                    print(f"\n[{stamp}] a file changed; no check changed: {report.score}/{report.total}", file=stream,
                          flush=True)
                else:
                    print(f"\n[{stamp}] changed since the last run ({last.score} -> {report.score}/{report.total}):",
                          file=stream)
                    for row in rows:
                        print(format_row(row), file=stream)
                    stream.flush()
            last = report
    except KeyboardInterrupt:
        print("\nstopped watching", file=stream)
    return 0
