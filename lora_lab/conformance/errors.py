"""What can go wrong in a check, and where: the exceptions the suite, the target's process and the grader share.

The bottom of the suite with ``registry``: it imports nothing of lora_lab, so every room above (``judge``,
``isolation``, ``properties``, the front ends) and the target's own process can use it.

- ``CheckFailed``: a property does not hold (the property's verdict).
- ``NotSupported``: the target declares, or was probed to have, no support for what a check needs.
- ``StubReached``: a learner's function is still the exercise's stub.
- ``TargetCrashed``, ``TargetTimedOut``, ``TargetImportError``: the target's process died, hung or did not import.
- ``RemoteError`` and ``remote_exception``: what the target raised in its process, raised again here as the same
  builtin kind, so that the properties catch it as they would in-process.
- ``user_traceback`` and ``raised_by_a_library``: the lines of a traceback that are the implementation's own.
- ``raised_by_the_suite`` and ``GRADER_ERROR``: an exception of the suite's own code (what the implementation did may
  have led it there, but the suite should have said so as a verdict), told apart from the implementation's by where
  its traceback: only the suite's frames and the libraries' (``user_traceback`` then says so), or the implementation's too.
"""

from __future__ import annotations

import builtins
import sysconfig
import traceback


class CheckFailed(AssertionError):
    """A property does not hold; the message says what was expected and what came out."""


class NotSupported(Exception):
    """Raised by a check when the target supports none of what the check needs; the message is the reason."""


class StubReached(BaseException):
    """A stub in the learner's file raised NotImplementedError: end the check at once.

    Hypothesis shrinks any failing ``Exception`` towards a minimal example, which
    for a stub is wasted time (a minute for the untouched exercises). A
    ``BaseException`` passes straight through hypothesis and the checks.
    """


class TargetCrashed(BaseException):
    """The target's process died during a call. A BaseException, so that hypothesis does not retry it."""


class TargetTimedOut(BaseException):
    """A call to the target ran past its time limit; its process was killed."""


class TargetImportError(ValueError):
    """The target (or a learner's file) did not import in its process; ``info`` holds its traceback."""

    def __init__(self, message: str, info: dict) -> None:
        super().__init__(message)
        self.info = info


class RemoteError(Exception):
    """An exception raised by the target in its process. Subclasses also derive from the builtin it derived from."""

    info: dict = {}


_ERROR_CLASSES: dict[str, type] = {}


def remote_exception(info: dict) -> BaseException:
    """An exception the properties can catch as they would in-process: a ValueError stays a ValueError."""
    if info.get("stub"):
        exc: BaseException = StubReached(info.get("message", ""))
    elif info.get("check_failed"):  # a property's own verdict, reached in the target's process (a model handle's)
        exc = CheckFailed(info.get("message", ""))
    else:
        base = next((getattr(builtins, n) for n in info.get("bases", ()) if isinstance(getattr(builtins, n, None), type)
                     and issubclass(getattr(builtins, n), Exception) and n != "Exception"), None)
        key = base.__name__ if base else "Exception"
        if key not in _ERROR_CLASSES:
            _ERROR_CLASSES[key] = type(key, (base, RemoteError) if base else (RemoteError,), {"__module__": "target"})
        exc = _ERROR_CLASSES[key](info.get("message", ""))
    exc.info = info
    return exc


SUITE_FOLDER = "/lora_lab/conformance/"
CALL_BOUNDARY = "<call>"  # the frame through which the target's process calls the target (``probes.invoke``)
GRADER_ERROR = "grader error (not your code)"  # how the detail of an error raised by the suite's own code begins
REPORT_IT = ("This is a bug in lora_lab's grader, or a case it does not handle yet: it should have told you what was "
             "wrong instead. Please report it to lora_lab's maintainers (an issue with this output).")
_LIBRARY_FOLDERS = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})


def _is_library(filename: str) -> bool:
    return (filename.startswith(_LIBRARY_FOLDERS) or "site-packages" in filename or "dist-packages" in filename
            or (filename.startswith("<") and filename != CALL_BOUNDARY))


def _chain_frames(exc: BaseException) -> list:
    """The frames of ``exc`` and of the exceptions it was raised from (Triton's interpreter re-raises a kernel's error
    ``from`` it: only the cause holds the kernel's own line)."""
    frames, seen = [], set()
    while exc is not None and id(exc) not in seen and len(seen) < 8:
        seen.add(id(exc))
        frames += traceback.extract_tb(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
    return frames


def raised_by_the_suite(exc: BaseException) -> bool:
    """True when ``exc`` was raised by the suite's own code with the implementation nowhere on the stack.

    Every frame of the exception (and of those it was raised from) is the suite's (``lora_lab/conformance/``) or a
    library's (Python's, torch's, hypothesis'), and at least one is the suite's. A frame of the implementation's, or
    the frame through which the target's process calls it (``<call>``: the suite's wrappers around a kernel launch
    run inside it), makes it the implementation's. Not the suite's either: what the target raised in its process
    (it has its own ``info``), and what torch's autograd engine raised while running a graph (the target built it:
    an in-place write to a tensor saved for backward is the target's mistake)."""
    if isinstance(getattr(exc, "info", None), dict):
        return False
    frames = _chain_frames(exc)
    if any(f.filename == CALL_BOUNDARY or "/torch/autograd/" in f.filename.replace("\\", "/") for f in frames):
        return False
    suite = [f for f in frames if SUITE_FOLDER in f.filename.replace("\\", "/")]
    return bool(suite) and all(f in suite or _is_library(f.filename) for f in frames)


def grader_error(exc: BaseException) -> str:
    """The detail of an error raised by the suite's own code: what, where in the suite, and that it is ours to fix."""
    frames = traceback.extract_tb(exc.__traceback__)
    suite = [f for f in frames if SUITE_FOLDER in f.filename.replace("\\", "/")]
    where = ""
    if suite:
        frame = suite[-1]
        where = f" at {frame.filename[frame.filename.rfind(SUITE_FOLDER) + 1:]}:{frame.lineno} ({frame.name})"
    return (f"{GRADER_ERROR}: {type(exc).__name__}: {exc}\nraised in the grader's own code{where}, not in yours. "
            f"{REPORT_IT}")


def user_traceback(exc: BaseException) -> str:
    """The traceback lines that are not lora_lab's or hypothesis' own: the implementation's. An exception of the
    suite's own code (``raised_by_the_suite``) is said to be the grader's instead (``grader_error``)."""
    if raised_by_the_suite(exc):
        return grader_error(exc)
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "/lora_lab/conformance/" not in f.filename and "/hypothesis/" not in f.filename
    ]
    lines = traceback.format_list(frames[-4:])
    return "".join(lines) + f"{type(exc).__name__}: {exc}"


def raised_by_a_library(exc: BaseException) -> bool:
    """True when the innermost frame is an installed package's (torch or torchao lacking an op): an error, not a stub."""
    if isinstance(getattr(exc, "info", None), dict):  # raised in the target's process, which looked at its frames
        return bool(exc.info.get("library"))
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and any(folder in frames[-1].filename for folder in ("site-packages", "dist-packages"))
