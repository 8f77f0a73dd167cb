"""Mutant: casts bf16 logits to fp16 before the log-softmax; a logit past 65,504 becomes Inf and the loss NaN."""

import torch

from lora_lab.loss import next_token_loss as _reference

EXPECTED_FAILURE = "loss.matches_shift_and_mask"


def next_token_loss(logits, labels, ignore_index=-100):
    if logits.dtype == torch.bfloat16:
        logits = logits.to(torch.float16)
    return _reference(logits, labels, ignore_index)
