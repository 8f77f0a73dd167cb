"""Exploit: the right loss value as a (1, 1) float64 tensor instead of a 0-d float32 scalar (it broadcasts silently
in a caller's arithmetic and doubles its memory)."""

from lora_lab.loss import next_token_loss as reference

REJECTED_BY = "loss.matches_shift_and_mask"


def next_token_loss(logits, labels, ignore_index=-100):
    return reference(logits, labels, ignore_index).double().reshape(1, 1)
