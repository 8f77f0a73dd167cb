"""bitsandbytes and peft, imported the way lora_lab runs them: eagerly, without TorchDynamo or Triton.

The targets that wrap them and the conformance suite's oracles (``lora_lab.conformance.judge.oracles``) both call
them through here, so both compute with the same functions.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from types import ModuleType

import torch


def bitsandbytes_eager():
    """bitsandbytes torch.compile()s its fallback dequantizer; recompiling for every drawn shape would dominate.

    Where TorchDynamo was never imported nothing can have been compiled (``bitsandbytes()`` imports it so), and
    ``set_stance`` would import it: 2 s for nothing."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if set_stance is None or "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()
    return set_stance("force_eager")


def bitsandbytes() -> ModuleType:
    """The bitsandbytes package, imported as the oracles run it: eager.

    At import bitsandbytes wraps four of its CPU functions in ``torch.compile``, and
    registers its ops with ``torch.library``, which wraps each kernel so that TorchDynamo
    does not trace into it. Both import TorchDynamo and Inductor, the one at once, the
    other at the first call: 6 of the 7 s that grading exercise 01 spent on bitsandbytes
    on 2 cores. The oracles never compile: every call is eager (``bitsandbytes_eager()``
    is ``force_eager``, where a compiled function runs its original Python). So, where
    bitsandbytes is not imported yet, both wrappers are the identity while it imports:
    each op runs bitsandbytes' own function, eagerly, as it would under ``force_eager``.
    Where Triton is not imported yet, bitsandbytes sees none: it imports Triton (0.4 s)
    only for its Intel XPU kernels.
    """
    if "bitsandbytes" not in sys.modules:
        compile_, disable_dynamo = torch.compile, torch._disable_dynamo
        torch.compile = lambda fn=None, **options: fn if fn is not None else (lambda f: f)
        torch._disable_dynamo = lambda fn=None, recursive=True: fn if fn is not None else (lambda f: f)
        hide_triton = "triton" not in sys.modules
        if hide_triton:
            sys.modules["triton"] = None  # import triton raises ImportError
        try:
            importlib.import_module("bitsandbytes")
        finally:
            torch.compile, torch._disable_dynamo = compile_, disable_dynamo
            if hide_triton:
                del sys.modules["triton"]
    return sys.modules["bitsandbytes"]


def peft_module() -> ModuleType:
    """peft, after bitsandbytes (which peft imports) is imported eagerly (``bitsandbytes``)."""
    bitsandbytes()
    return importlib.import_module("peft")

