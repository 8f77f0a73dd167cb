"""Exploit: the right answer, a hundred times slower than the reference (a sleep stands in for the wasted work): a
correctness suite passes it; a per-check time budget measured beside the reference's (50x) does not, at a realistic
size (Llama 3's 128,256-token vocabulary; at tiny sizes fixed per-call costs dominate, and the budget's floor absorbs
them)."""

import time

from lora_lab.loss import next_token_loss as reference

REJECTED_BY = "loss.llama_vocab"


def next_token_loss(logits, labels, ignore_index=-100):
    start = time.perf_counter()
    loss = reference(logits, labels, ignore_index)
    time.sleep(99 * (time.perf_counter() - start))
    return loss
