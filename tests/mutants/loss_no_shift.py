"""Mutant: compares position t's logits with label t (no shift), so the model is asked to copy its input."""

import torch.nn.functional as F

from lora_lab.loss import check_loss_inputs

EXPECTED_FAILURE = "loss.matches_transformers"


def next_token_loss(logits, labels, ignore_index=-100):
    check_loss_inputs(logits, labels, ignore_index)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index)
