"""A learner's exercise files, loaded in the target's process as the grader needs them.

Loaded by path, one after another in the same process (so one exercise can import another:
``from ex01_nf4 import quantize_nf4``); a stub ends a check at once (``as_stub``), and a traceback shows the learner's
own lines (``learner_traceback``). ``--chain`` rebinds the reference pieces an exercise imports to the learner's own
(``chain_to_learner``).
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Any

from lora_lab.conformance.errors import StubReached


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

