"""Mutant: training_step averages each row's loss, then the rows: right only while every row holds one label."""

import torch.nn.functional as F

from lora_lab.model import apply_qlora  # noqa: F401  (applying QLoRA is right)

EXPECTED_FAILURE = "training.matches_reference"


def training_step(model, batch, optimizer):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    loss = (per_token.sum(1) / (labels != -100).sum(1).clamp(min=1)).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
