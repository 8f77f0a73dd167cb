"""Mutant: stores labels as 16-bit token ids (as many datasets do), which wrap past 65,535; Llama 3 has 128,256."""

import torch

from lora_lab.loss import next_token_loss as _reference

EXPECTED_FAILURE = "loss.llama_vocab"


def next_token_loss(logits, labels, ignore_index=-100):
    stored = torch.where(labels == ignore_index, labels, labels % 65_536)  # what uint16 storage keeps
    return _reference(logits, stored, ignore_index)
