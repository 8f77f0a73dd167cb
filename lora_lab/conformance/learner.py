"""A learner's exercise file as the suite sees it: loaded from its path, its stubs and tracebacks told apart.

``lora-lab grade`` has each exercise file loaded by path in the learner's own
process (``child.py``; so one exercise can import another: ``from ex01_nf4
import quantize_nf4``), wrapped so that a stub ends a check at once, and shows
the learner their own traceback lines rather than the suite's or torch's.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Any


class StubReached(BaseException):
    """A stub in the learner's file raised NotImplementedError: end the check at once.

    Hypothesis shrinks any failing ``Exception`` towards a minimal example, which
    for a stub is wasted time (a minute for the untouched exercises). A
    ``BaseException`` passes straight through hypothesis and the checks.
    """


def inside(filename: str, folder: Path) -> bool:
    try:
        return Path(filename).resolve().is_relative_to(folder)
    except (OSError, ValueError):
        return False


def as_stub(exc: NotImplementedError, folder: Path) -> BaseException:
    """``StubReached`` for a NotImplementedError raised by one of the learner's stubs; else the error itself."""
    if raised_in(exc, folder):
        stub = StubReached(str(exc))
        stub.__cause__ = exc
        return stub
    return exc


def raised_in(exc: BaseException, folder: Path) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and inside(frames[-1].filename, folder)


def learner_traceback(exc: BaseException, folder: Path, limit: int = 6) -> str:
    """The traceback lines in the learner's files, plus the line that raised if it is elsewhere (inside torch).

    Explicitly chained causes are followed: Triton's interpreter re-raises an error
    in a kernel as ``InterpreterError(...) from error``, and only the cause's
    traceback holds the kernel's own line.
    """
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 4:
        chain.append(chain[-1].__cause__)
    frames = [frame for link in chain for frame in traceback.extract_tb(link.__traceback__)]
    mine = [f for f in frames if inside(f.filename, folder)][-limit:]
    if frames and (not mine or frames[-1] is not mine[-1]):
        mine.append(frames[-1])
    return "".join(traceback.format_list(mine)) + f"{type(exc).__name__}: {exc}"


def load_learner_module(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # so that one exercise can `from ex01_nf4 import ...` the learner's own work
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(path.stem, None)
        raise
    return module
