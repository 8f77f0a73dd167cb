"""Mutant: no input validation, so a batch without a single label gives a NaN loss instead of an error."""

import torch.nn.functional as F

EXPECTED_FAILURE = "loss.rejects_bad_input"


def next_token_loss(logits, labels, ignore_index=-100):
    predictions, targets = logits[:, :-1].float(), labels[:, 1:]
    return F.cross_entropy(predictions.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)
