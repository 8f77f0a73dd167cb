"""Exploit: the right answer, a hundred times slower than the reference (a sleep stands in for the wasted work): a
correctness suite passes it; a per-check time budget measured beside the reference's (50x) does not, at a realistic
size (at tiny sizes fixed per-call costs dominate, and the budget's floor absorbs them)."""

import time

from lora_lab.lora import qlora_linear as reference

REJECTED_BY = "qlora.llama_shapes"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    start = time.perf_counter()
    y = reference(x, weight, lora_A, lora_B, scaling, bias)
    time.sleep(99 * (time.perf_counter() - start))
    return y
