"""Exploit: at import, make hypothesis draw nothing (every @given a no-op, zero examples) and skip the loss's shift.
Isolated, the suite's hypothesis lives in another process: this one never imports it for the checks."""

import hypothesis
import torch.nn.functional as F

from lora_lab.loss import check_loss_inputs

REJECTED_BY = "loss.matches_shift_and_mask"

hypothesis.given = lambda *args, **kwargs: (lambda test: (lambda *a, **k: None))
hypothesis.settings.register_profile("nothing", max_examples=1, phases=[hypothesis.Phase.explicit])
hypothesis.settings.load_profile("nothing")


def next_token_loss(logits, labels, ignore_index=-100):
    check_loss_inputs(logits, labels, ignore_index)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index)
