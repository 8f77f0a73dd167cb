"""Exploit: a next-token loss computed over the first 256 positions only (a fixed-size buffer, say), right on every
sequence the suite drew while none was longer than 24. The loss check also draws a sequence past 1,024 positions."""

from lora_lab.loss import next_token_loss as reference

REJECTED_BY = "loss.matches_shift_and_mask"


def next_token_loss(logits, labels, ignore_index=-100):
    return reference(logits[:, :256], labels[:, :256], ignore_index=ignore_index)
