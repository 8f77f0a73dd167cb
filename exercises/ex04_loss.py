"""Exercise 04: the next-token loss, with the prompt masked out.

Lecture step 2, the loss: one number that says how wrong the model's guesses
are. The backward pass (step 3) differentiates exactly this number, so a
mistake here trains the model on the wrong thing while everything still runs.

The idea
--------
A causal language model outputs, at every position t, logits over the
vocabulary: its guess for the token at position t + 1. So the loss pairs the
logits at t with the label at t + 1:

    loss = mean over t with labels[t+1] != -100 of   -log softmax(logits[t])[labels[t+1]]

* **The shift.** ``labels`` line up with ``input_ids`` (label t is token t), the
  convention of Hugging Face transformers, and the loss does the shifting: drop
  the last position's logits (nothing follows it) and the first label (nothing
  predicts it). Forget the shift and the model is trained to copy its input.
* **Prompt masking.** Our data asks "How much does this cost to the nearest
  dollar? <description> Price is $" and the answer is one token, the price
  (numbers 0-999 are single tokens, as in Llama 3). ``lora_lab.data.collate``
  sets every label to -100 (``ignore_index``) except the price token, so the
  model learns to answer the question, not to write product descriptions. The
  mean is over the labels that remain, so here the loss is exactly
  -log P(true price | prompt), averaged over the batch.
* **Precision.** Take the log-softmax in float32 even when the logits are
  fp16/bf16: over a large vocabulary 16 bits lose too much (transformers does
  the same).

The spec
--------
``next_token_loss(logits, labels, ignore_index=-100) -> scalar tensor``

* ``logits`` is (batch, seq, vocab) float; ``labels`` is (batch, seq) int64.
* Returns the mean cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]``
  over the labels that are not ``ignore_index``, as a float32 scalar that
  autograd can differentiate back to the logits.
* Raise ValueError, saying what was expected, when logits and labels disagree
  on batch size or length, and when no label is left to learn from after the
  shift and the mask: the mean over zero tokens is NaN, and a NaN loss quietly
  poisons every weight it reaches.

The grader compares with the loss transformers computes itself when you pass
``labels`` to a Llama, and with a float64 computation of the loss and its
gradient, on drawn batch sizes,
sequence lengths, vocabularies and masks.

``torch.nn.functional.cross_entropy`` may be used (it takes ``ignore_index``).

Grading: ``lora-lab grade --only 04`` (or ``python exercises/ex04_loss.py``).

The reference solution is lora_lab/loss.py (and the masking, lora_lab/data.py
``collate``). Try first!
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: F401  (cross_entropy is allowed)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]`` over labels that are not ``ignore_index``."""
    # 1. validate   2. pair each position's logits with the NEXT label   3. cross-entropy in float32, ignoring -100
    raise NotImplementedError("exercise 04: write next_token_loss")


if __name__ == "__main__":  # python exercises/ex04_loss.py grades this file alone
    import os

    from lora_lab.conformance.grading.command import main

    raise SystemExit(main(["--only", "04", "--path", os.path.dirname(os.path.abspath(__file__))]))
