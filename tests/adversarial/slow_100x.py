"""Exploit: the right answer, a hundred times slower than the reference (a sleep stands in for the wasted work): a
correctness suite passes it; a per-check time budget measured beside the reference's does not."""

import time

from lora_lab.lora import qlora_linear as reference

REJECTED_BY = "qlora.forward_matches_float64"
NEEDS = "a per-check time budget against the reference's time (issue 16 item 2): not built yet"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    start = time.perf_counter()
    y = reference(x, weight, lora_A, lora_B, scaling, bias)
    time.sleep(99 * (time.perf_counter() - start))
    return y
