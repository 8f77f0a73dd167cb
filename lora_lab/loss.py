"""Step 2 of the lecture: the loss, cross-entropy on the next token.

A causal language model's logits at position t are its guess for the token at
position t + 1. So the loss pairs ``logits[:, t]`` with ``labels[:, t + 1]``:
drop the last position's logits (nothing follows it) and the first label
(nothing predicts it). Labels equal to ``ignore_index`` (-100) are skipped,
and the mean is over the labels that remain. For our price prompts only the
price token is labelled, so the loss is exactly -log P(true price | prompt).

``labels`` line up with ``input_ids`` and the loss does the shifting, the
convention of Hugging Face transformers, whose own loss must agree with this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_loss_inputs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> None:
    """Raise ValueError for inputs that would give a wrong or NaN loss instead of a clear error."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError("expected logits to be a floating-point tensor of shape (batch, sequence, vocab)")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long:
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"expected labels to be an int64 tensor of shape (batch, sequence), got {got}")
    if logits.dim() != 3 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"expected logits (batch, sequence, vocab) and labels (batch, sequence) with the same batch and sequence, "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    targets = labels[:, 1:]
    valid = targets != ignore_index
    if not valid.any():
        raise ValueError(
            f"no label to learn from: every label after the first position is ignore_index={ignore_index} "
            "(the mean over zero tokens would be NaN); check the label masking and truncation"
        )
    out_of_range = valid & ((targets < 0) | (targets >= logits.shape[-1]))
    if out_of_range.any():
        raise ValueError(f"expected labels in [0, {logits.shape[-1]}) or {ignore_index}, got {targets[out_of_range][0].item()}")


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]`` over non-ignored labels.

    Computed in float32 even for half-precision logits (as transformers does):
    log-softmax over a large vocabulary loses too much in 16 bits.
    """
    check_loss_inputs(logits, labels, ignore_index)
    predictions = logits[:, :-1, :].float()  # position t predicts ...
    targets = labels[:, 1:]  # ... the token at t + 1
    return F.cross_entropy(predictions.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


def predicts_a_label(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(batch, sequence) booleans: True at position t when the token at t + 1 is learned from.

    These are the only positions whose logits the loss reads; the last position
    predicts nothing. ``model(..., logits_to_keep=predicts_a_label(labels))``
    (transformers) computes ``lm_head`` there alone.
    """
    keep = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    keep[:, :-1] = labels[:, 1:] != ignore_index
    return keep


def labelled_token_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``next_token_loss`` from only the logits it reads: the rows of ``predicts_a_label(labels)``, in (batch, position) order.

    ``logits`` is (labelled tokens, vocab), as ``hidden[predicts_a_label(labels)]``
    through ``lm_head`` gives it; the result equals ``next_token_loss`` of the
    full logits, since the positions left out never reach the mean.
    """
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long or labels.dim() != 2:
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"expected labels to be an int64 tensor of shape (batch, sequence), got {got}")
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 2:
        got = f"{logits.dtype} {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"expected logits (labelled tokens, vocab) at the positions predicts_a_label marks, got {got}")
    targets = labels[:, 1:][labels[:, 1:] != ignore_index]
    if targets.numel() == 0:
        raise ValueError(
            f"no label to learn from: every label after the first position is ignore_index={ignore_index} "
            "(the mean over zero tokens would be NaN); check the label masking and truncation"
        )
    if logits.shape[0] != targets.numel():
        raise ValueError(f"expected one row of logits per labelled token ({targets.numel()}), got {logits.shape[0]}: pass "
                         "the logits at predicts_a_label(labels), or use next_token_loss for (batch, sequence, vocab) logits")
    out_of_range = (targets < 0) | (targets >= logits.shape[-1])
    if out_of_range.any():
        raise ValueError(f"expected labels in [0, {logits.shape[-1]}) or {ignore_index}, got {targets[out_of_range][0].item()}")
    return F.cross_entropy(logits.float(), targets)
