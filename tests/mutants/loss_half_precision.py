"""Mutant: computes the cross-entropy in the logits' own dtype, so bf16 logits give a loss rounded to 8 bits."""

import torch.nn.functional as F

from lora_lab.loss import check_loss_inputs

EXPECTED_FAILURE = "loss.matches_shift_and_mask"


def next_token_loss(logits, labels, ignore_index=-100):
    check_loss_inputs(logits, labels, ignore_index)
    predictions, targets = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(predictions.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)
