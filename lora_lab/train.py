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

Logits only where labels are. The loss reads the logits of the positions whose
next token is labelled, and nothing else: for a price prompt that is one
position of about sixty. So step 1 asks the model for those rows alone
(``logits_to_keep``, as transformers' generation and Liger's fused linear
cross-entropy do), and ``lm_head`` multiplies (labelled tokens x hidden) by
(hidden x vocab) instead of (batch x sequence x hidden). With Llama 3's
128,256-token vocabulary the full logits of a batch of 16 x 64 are 525 MB in
fp32, and their gradient as much again; the kept ones are 8 MB. The loss is the
same number with the same gradients (``next_token_loss`` of the full logits is
a mean over exactly these rows): the ``training.gradients_match_full_logits``
property checks it against transformers' own loss.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from lora_lab import data
from lora_lab.loss import labelled_token_loss, predicts_a_label
from lora_lab.model import PRESETS, tiny_llama


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Step 1: logits (labelled tokens, vocab) at the positions that predict a label (the price), in (row, position) order."""
    keep = predicts_a_label(batch["labels"])
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits


def compute_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Step 2: how wrong those next-token guesses are: mean cross-entropy against the labels they predict."""
    return labelled_token_loss(logits, labels)


def backward(loss: torch.Tensor) -> None:
    """Step 3: d(loss)/d(parameter) into ``.grad``, for the parameters that require it (the adapters)."""
    loss.backward()


def optimize(optimizer: torch.optim.Optimizer) -> None:
    """Step 4: update the parameters from their gradients, then clear the gradients (they would add up)."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
    """The four steps once; returns the loss measured *before* this step's update."""
    logits = forward(model, batch)
    loss = compute_loss(logits, batch["labels"])
    backward(loss)
    optimize(optimizer)
    return loss.item()


# ---------------------------------------------------------------------------- the base model
# QLoRA starts from a pre-trained model. Ours is pre-trained here, briefly, on
# shop listings ("... Sells for $54."): it learns the products and their prices,
# but never sees the lecture's question. Fine-tuning then teaches it to answer.

PRETRAIN_STEPS = 300
PRETRAIN_BATCH = 32
PRETRAIN_LR = 3e-3
PRETRAIN_WARMUP = 20


def cache_dir() -> Path:
    """``$LORA_LAB_CACHE``, else ``$XDG_CACHE_HOME/lora_lab``, else ``~/.cache/lora_lab``."""
    if os.environ.get("LORA_LAB_CACHE"):
        return Path(os.environ["LORA_LAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora_lab"


def _pretrain_key(seed: int, steps: int) -> str:
    """Changes whenever anything that shapes the pre-trained weights changes, so a stale cache is never used."""
    recipe = repr((PRESETS["tiny"], data.VOCABULARY, data.CATEGORIES, data.BRAND_TIERS, data.TEMPLATES, data.LISTING_PRICE_PREFIX,
                   seed, steps, PRETRAIN_BATCH, PRETRAIN_LR, PRETRAIN_WARMUP))
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def pretrain(model: nn.Module, steps: int = PRETRAIN_STEPS, seed: int = 0, progress: bool = False) -> list[float]:
    """Full fine-tuning (every weight, dense) on freshly generated listings, with warmup and linear decay."""
    from tqdm.auto import tqdm

    if steps <= 0:
        return []
    products = data.generate_products(steps * PRETRAIN_BATCH, seed=10_000 + seed)  # never the demo's products
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / PRETRAIN_WARMUP) * max(0.05, 1 - s / steps)
    )
    model.train()
    losses = []
    for step in tqdm(range(steps), desc="pre-training the base model", disable=not progress, leave=False):
        batch = data.collate_listings(products[step * PRETRAIN_BATCH : (step + 1) * PRETRAIN_BATCH])
        losses.append(training_step(model, batch, optimizer))
        schedule.step()
    return losses


def pretrained_tiny_llama(seed: int = 0, steps: int = PRETRAIN_STEPS, progress: bool = False) -> tuple[nn.Module, Path, bool]:
    """The tiny base model after ``pretrain``, loaded from the cache when it is there.

    Returns ``(model, cache file, whether it came from the cache)``.
    """
    from safetensors.torch import load_file, save_file

    model = tiny_llama(seed)
    path = cache_dir() / f"tiny-llama-base-{_pretrain_key(seed, steps)}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(path))
        return model, path, True
    pretrain(model, steps, seed, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, partial)
    os.replace(partial, path)  # atomic: a concurrent demo never reads half a file
    return model, path, False
