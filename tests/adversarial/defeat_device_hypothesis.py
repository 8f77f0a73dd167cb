"""Exploit (a "defeat device"): correct only while hypothesis is running a test, wrong (no shift) otherwise.
Isolated, hypothesis runs in the parent: the target's process never imports it."""

import sys

import torch.nn.functional as F

from lora_lab.loss import check_loss_inputs
from lora_lab.loss import next_token_loss as reference_loss

REJECTED_BY = "loss.matches_shift_and_mask"


def _under_test() -> bool:
    control = sys.modules.get("hypothesis.control")
    return control is not None and control.currently_in_test_context()


def next_token_loss(logits, labels, ignore_index=-100):
    if _under_test():
        return reference_loss(logits, labels, ignore_index)
    check_loss_inputs(logits, labels, ignore_index)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index)
