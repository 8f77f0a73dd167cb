"""lora_lab's reference timed on a target's inputs: the yardstick of the time budget (``registry.TIME_BUDGET``).

A timed check (``Check.timed``: the realistic sizes) holds a correct answer to a
multiple of the reference's time on the same calls. ``proxy._Call.run`` times the
reference here, in the suite's process, just before the target's turn, and the
target by the suite's clock around its request: neither time comes from the target.
"""

from __future__ import annotations

import time

import torch

TIMED_OPS = ("quantize_nf4", "dequantize_nf4", "qlora_linear", "next_token_loss", "adamw_step")
SAMPLES = 3  # calls per op and check timed against the reference


def reference_seconds(op: str, args: tuple, kwargs: dict) -> float | None:
    """Seconds lora_lab's own ``op`` takes on copies of ``args`` and ``kwargs``; None where it rejects them."""
    import lora_lab
    from lora_lab.conformance.judge.contract import owned_copy

    copies_args, copies_kwargs = owned_copy(args), owned_copy(kwargs)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            getattr(lora_lab, op)(*copies_args, **copies_kwargs)
    except Exception:  # noqa: BLE001 - bad input, as the rejects_bad_input checks pass it: nothing to compare
        return None
    return time.perf_counter() - start
