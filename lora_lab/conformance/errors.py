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
"""

from __future__ import annotations

import builtins
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


def user_traceback(exc: BaseException) -> str:
    """The traceback lines that are not lora_lab's or hypothesis' own: the implementation's."""
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
