"""Mutant: returns the right loss as a (1, 1) float64 tensor instead of a 0-d float32 scalar."""

from lora_lab.loss import next_token_loss as _reference

EXPECTED_FAILURE = "loss.matches_shift_and_mask"


def next_token_loss(logits, labels, ignore_index=-100):
    return _reference(logits, labels, ignore_index).double().reshape(1, 1)
