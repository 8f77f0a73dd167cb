"""Mutant: sums the cross-entropy of the labelled tokens but divides by every position, padding included."""

import torch.nn.functional as F

from lora_lab.loss import check_loss_inputs

EXPECTED_FAILURE = "loss.matches_shift_and_mask"


def next_token_loss(logits, labels, ignore_index=-100):
    check_loss_inputs(logits, labels, ignore_index)
    predictions, targets = logits[:, :-1].float(), labels[:, 1:]
    total = F.cross_entropy(predictions.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index,
                            reduction="sum")
    return total / targets.numel()
