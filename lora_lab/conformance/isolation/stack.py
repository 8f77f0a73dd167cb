"""The suite's own oracle process: peft, bitsandbytes and transformers, imported while the other checks run.

No target runs there: it serves ``stack_oracle.py``'s functions through the same proxy as a target's
(``proxy.RemoteTarget``), for the checks that name what they need in ``Check.stack``.
"""

from __future__ import annotations

from lora_lab.conformance.isolation.process import STACK_MODULE
from lora_lab.conformance.isolation.proxy import RemoteTarget

_STACK: dict = {}


def stack(preload: tuple[str, ...] = ()):
    """The oracles that need peft, bitsandbytes or transformers (``stack_oracle``), in a process of their own
    (``proxy.RemoteTarget``), for the checks that name what they need in ``Check.stack``.

    Importing peft takes 5-7 s on 2 cores, transformers about 3 s. Started early (``start_stack``), that process
    imports ``preload`` on the core the suite and the target's process leave idle while they take turns, so the
    suite itself never imports them for these checks. Started once, it serves every check until ``close_stack``.
    """
    if "target" not in _STACK:
        _STACK["target"] = RemoteTarget(STACK_MODULE, name="peft, bitsandbytes and transformers (the oracles)",
                                        wait=False, preload=preload,
                                        sandboxed=False)  # the suite's own code: no target runs there
    return _STACK["target"]


def start_stack(checks) -> None:
    """Start ``stack()``'s process now, without waiting, importing what ``checks`` will need there."""
    preload = tuple(dict.fromkeys(module for check in checks for module in check.stack))
    if preload:
        stack(preload)


def close_stack() -> None:
    target = _STACK.pop("target", None)
    if target is not None:
        target.close()

