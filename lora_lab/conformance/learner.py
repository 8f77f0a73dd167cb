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

MISSING = "missing"  # the exercise file, or the function a check needs, is not there
NOT_YOURS = "not your code"  # the function a check needs is lora_lab's own, imported into the exercise file


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


def _chain_pieces() -> dict[int, tuple[str, str]]:
    """The reference pieces an exercise may import, by identity, and the earlier exercise that teaches each one."""
    from lora_lab import loss, nf4

    return {
        id(nf4.quantize_nf4): ("ex01_nf4", "quantize_nf4"),
        id(nf4.dequantize_nf4): ("ex01_nf4", "dequantize_nf4"),
        id(loss.next_token_loss): ("ex04_loss", "next_token_loss"),
    }


def chain_to_learner(module: Any, folder: Path) -> list[str]:
    """Rebind ``module``'s names for the reference's pieces to the learner's own earlier ones (``grade --chain``).

    Exercises 02, 03 and 06 import lora_lab's quantize_nf4, dequantize_nf4 and next_token_loss by default, so a bug
    in the learner's exercise 01 or 04 never shows downstream. Returns one line per name: what it now calls.
    """
    notes = []
    pieces = _chain_pieces()
    for name, value in list(vars(module).items()):
        if name.startswith("__") or id(value) not in pieces:
            continue
        stem, attribute = pieces[id(value)]
        if stem == module.__name__:
            continue  # the exercise that teaches the piece keeps what it imports
        path = folder / f"{stem}.py"
        try:
            earlier = sys.modules.get(stem) or load_learner_module(path)
        except FileNotFoundError:
            notes.append(f"{name}: no {stem}.py here, so the reference's")
            continue
        except Exception as exc:  # noqa: BLE001 - the earlier file is the learner's: say so, keep the reference
            notes.append(f"{name}: your {stem}.py does not import ({type(exc).__name__}), so the reference's")
            continue
        mine = getattr(earlier, attribute, None)
        if not callable(mine):
            notes.append(f"{name}: your {stem}.py has no {attribute}, so the reference's")
        elif mine is value:
            notes.append(f"{name}: your {stem}.py imports the reference's {attribute} too")
        else:
            setattr(module, name, mine)
            notes.append(f"{name} -> your {stem}.{attribute}")
    return notes


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
    "missing"."""
    from lora_lab.conformance.registry import ERROR, FAILED, NOT_ATTEMPTED, NOT_PROVIDED, PASSED

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
    return status, detail
