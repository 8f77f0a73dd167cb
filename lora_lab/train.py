"""One QLoRA training step, in the lecture's four steps.

    logits = forward(model, batch)                      1. forward pass
    loss = compute_loss(logits, batch["labels"])        2. loss
    backward(loss)                                      3. backward pass
    optimize(optimizer)                                 4. optimization

In the forward pass the frozen NF4 weights are dequantized on the fly; the
backward pass sends gradients through them to the LoRA adapters, the only
tensors with ``requires_grad``; the optimizer updates the adapters and clears
their gradients for the next step. The model's mode (``train()`` / ``eval()``)
is the caller's choice: it decides whether adapter dropout is active.

``training_step`` runs the four steps once, with one optimization flagged where
it happens: step 1 as ``forward_labelled``, logits only where the loss reads
them (the last section of this file says why).
"""

from __future__ import annotations

import torch
from torch import nn

from lora_lab.loss import labelled_token_loss, next_token_loss, predicts_a_label


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Step 1: logits (batch, sequence, vocab), the model's score for every possible next token at every position."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def compute_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Step 2: how wrong those next-token guesses are: mean cross-entropy of position t against label t + 1."""
    if logits.dim() == 2:  # forward_labelled's rows: the same mean, from the only rows it reads
        return labelled_token_loss(logits, labels)
    return next_token_loss(logits, labels)


def backward(loss: torch.Tensor) -> None:
    """Step 3: d(loss)/d(parameter) into ``.grad``, for the parameters that require it (the adapters)."""
    loss.backward()


def optimize(optimizer: torch.optim.Optimizer) -> None:
    """Step 4: update the parameters from their gradients, then clear the gradients (they would add up)."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
    """The four steps once; returns the loss measured *before* this step's update."""
    logits = forward_labelled(model, batch)  # training-time optimization: lm_head only where the loss reads (see below)
    loss = compute_loss(logits, batch["labels"])
    backward(loss)
    optimize(optimizer)
    return loss.item()


# ---------------------------------------------------------------------------- optional: logits only where labels are
# The loss reads the logits of the positions whose next token is labelled, and
# nothing else: for a price prompt that is one position of about sixty. So step 1
# can ask the model for those rows alone (``logits_to_keep``, as transformers'
# generation and Liger's fused linear cross-entropy do), and ``lm_head`` then
# multiplies (labelled tokens x hidden) by (hidden x vocab) instead of
# (batch x sequence x hidden). With Llama 3's 128,256-token vocabulary the full
# logits of a batch of 16 x 64 are 525 MB in fp32, and their gradient as much
# again; the kept ones are 8 MB. ``compute_loss`` of these rows is the same number
# with the same gradients (``next_token_loss`` of the full logits is a mean over
# exactly these rows): the ``training.gradients_match_full_logits`` property checks
# it against transformers' own loss over every position.


def forward_labelled(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Step 1, optimized: logits (labelled tokens, vocab) at the positions that predict a label, in (row, position) order."""
    keep = predicts_a_label(batch["labels"])
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
