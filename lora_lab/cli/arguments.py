"""Flag values the commands check before any work: numbers in their range, and output paths that can be written.

A wrong flag should cost a new user a second, not the run it ends: ``lora-lab
train --dropout 1.5`` must not import torch first, and ``lora-lab demo --out
README.md`` must not train for a minute and then fail to save the chart. So the
numbers are checked by argparse itself (``number`` and ``whole_number`` are
``type=`` functions: the error names the flag and the value, exit status 2), and
each command checks its output paths (``output_folder_problem``,
``output_file_problem``) before it starts.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _interval(low: float, high: float, open_low: bool, open_high: bool) -> str:
    if high == math.inf:
        return f"> {low:g}" if open_low else f">= {low:g}"
    return f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"


def number(low: float, high: float = math.inf, open_low: bool = False, open_high: bool = False) -> Callable[[str], float]:
    """An argparse ``type=``: a finite float between ``low`` and ``high`` (``open_*``: that end excluded)."""
    expected = f"expected a number {_interval(low, high, open_low, open_high)}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
        too_low = value <= low if open_low else value < low
        too_high = value >= high if open_high else value > high
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        return value

    return parse


def whole_number(least: int, most: int | None = None, why: str = "") -> Callable[[str], int]:
    """An argparse ``type=``: an integer from ``least`` to ``most`` (no upper end when None); ``why`` explains ``most``."""
    expected = f"expected a whole number >= {least}" if most is None else f"expected a whole number from {least} to {most}"
    expected += f" ({why})" if why else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
        if value < least or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        return value

    return parse


def _nearest_existing(path: Path) -> Path:
    """``path`` itself, or the closest of its parents that exists (``.`` for a relative path, at worst)."""
    return next(p for p in (path, *path.parents) if p.exists())


def _can_write_into(folder: Path) -> bool:
    """Whether a file can be created in ``folder``, tried rather than asked.

    ``os.access`` answers yes to root everywhere, /proc included, where nothing can
    be created. An unnamed temporary file (O_TMPFILE on Linux; elsewhere one
    removed at once) is the real test, and leaves nothing behind.
    """
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _unwritable(flag: str, value: Path, folder: Path, expected: str) -> str | None:
    """Why ``folder`` (where ``value`` goes) cannot be made or written into, or None."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        return f"{flag} {value}: {existing} is a file, so nothing can be created under it; expected {expected}"
    if not _can_write_into(existing):
        return f"{flag} {value} cannot be written ({existing} is not writable); expected {expected}"
    return None


def output_folder_problem(flag: str, folder: str | Path, purpose: str) -> str | None:
    """What is wrong with ``folder`` as a command's output folder, or None; ``purpose`` says what goes into it.

    Nothing is created: the command makes the folder once its work is done.
    """
    folder = Path(folder)
    expected = f"a folder {purpose}"
    if folder.exists() and not folder.is_dir():
        return f"{flag} {folder} is a file; expected {expected}"
    return _unwritable(flag, folder, folder, expected)


def output_file_problem(flag: str, file: str | Path, purpose: str) -> str | None:
    """What is wrong with ``file`` as a file a command writes (making its parent folders), or None."""
    file = Path(file)
    expected = f"a file name {purpose}"
    if file.is_dir():
        return f"{flag} {file} is a folder; expected {expected}"
    if file.exists() and not os.access(file, os.W_OK):
        return f"{flag} {file} cannot be written (it is read-only); expected {expected}"
    return _unwritable(flag, file, file.parent, expected)
