"""Mutant: computes lm_head at the positions of the labels themselves, not at the positions that predict them (no shift)."""

import torch.nn.functional as F

from lora_lab import apply_qlora  # noqa: F401  (provided as is: the mistake is in the step)

EXPECTED_FAILURE = "training.gradients_match_full_logits"


def training_step(model, batch, optimizer):
    labels = batch["labels"]
    keep = labels != -100  # should be: position t kept when labels[t + 1] is labelled
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    loss = F.cross_entropy(logits.float(), labels[keep])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
