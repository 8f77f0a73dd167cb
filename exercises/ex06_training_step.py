"""Exercise 06: make a model QLoRA, and train it one step.

All four of the lecture's steps, in order, on a real (tiny) Llama:

    1. forward   logits = model(input_ids, attention_mask)        frozen NF4 base + adapters
    2. loss      loss = next_token_loss(logits, labels)           exercise 04
    3. backward  loss.backward()                                  gradients reach only the adapters
    4. optimize  optimizer.step(); optimizer.zero_grad()          exercise 05's AdamW, on A and B

The idea
--------
``apply_qlora`` turns an ordinary model into a QLoRA model, in place. In a
Llama the attention projections ``q_proj``, ``k_proj``, ``v_proj`` and
``o_proj`` are ``nn.Linear`` layers; each one named in ``target_modules`` is
replaced by a ``lora_lab.lora.QLoRALinear`` built from it
(``QLoRALinear.from_linear(linear, r=..., alpha=..., dropout=..., **quant_kwargs)``
quantizes its weight to NF4 and attaches fresh adapters with B = 0, so the
model's output does not change beyond NF4 rounding).

QLoRA freezes *and quantizes* the whole base, not only the targets: every
other ``nn.Linear`` (the MLP's ``gate_proj``, ``up_proj`` and ``down_proj`` by
default) becomes a ``lora_lab.lora.NF4Linear``
(``NF4Linear.from_linear(linear, blocksize=..., double_quant=..., compute_dtype=...)``: the same
frozen NF4 weight, no adapters), as bitsandbytes' ``load_in_4bit`` does. Only
``lm_head`` keeps its dense weight. Left dense, the MLP of Llama 3.1 8B alone
would hold about 11 GB of bf16 weights. Every remaining parameter (embeddings,
norms, the output head) is frozen: ``requires_grad`` False. Then the optimizer
only sees the adapters, which are well under 1% of the numbers of a real
model, and the base is 4-bit: that is why QLoRA fits on one GPU.

``training_step`` then runs the four steps once. Two details matter:

* Return the loss measured *before* the update, as a Python float (``.item()``):
  that is the number a progress bar shows for this step.
* Clear the gradients after the update (``optimizer.zero_grad(set_to_none=True)``):
  PyTorch *adds* each backward's gradients to ``.grad``, so forgetting this
  makes every step use the sum of all gradients so far.

The spec
--------
``apply_qlora(model, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), r=8, alpha=16, dropout=0.0,
**quant_kwargs) -> model``

* Replace every ``nn.Linear`` whose *last* name (``model.layers.0.self_attn.q_proj``
  ends in ``q_proj``) is in ``target_modules`` by a ``QLoRALinear``; pass
  ``quant_kwargs`` (such as ``blocksize``, ``double_quant``, ``use_rslora``) on to
  ``from_linear``.
* Replace every *other* ``nn.Linear`` except ``lm_head`` by an ``NF4Linear``
  with the same ``blocksize``, ``double_quant`` and ``compute_dtype`` (defaults
  64, True and None). ``compute_dtype`` is bitsandbytes' ``bnb_4bit_compute_dtype``:
  every quantized layer, targeted or not, computes in it (graded).
* Freeze every other parameter. Return the same model object.
* The adapters stay fp32, even in a bf16 model (``QLoRALinear.from_linear``
  makes them so): an AdamW step of lr 1e-4 is below bf16's resolution for
  most of their entries. Never cast the whole model after swapping.
* Raise ValueError when a target module matches no ``nn.Linear``, naming it and
  listing the linear layers the model has (a typo such as "q_prj" must not
  silently train nothing).

``training_step(model, batch, optimizer) -> float``

* ``batch`` holds ``input_ids``, ``attention_mask`` and ``labels`` (see
  ``lora_lab.data.collate``); the model is a transformers Llama, so
  ``model(input_ids=..., attention_mask=...).logits`` is (batch, seq, vocab).
* Use next-token loss (yours from exercise 04, or ``lora_lab.loss.next_token_loss``).
* Leave the model's train/eval mode alone: that is the caller's choice.

The grader builds ``lora_lab.model.tiny_llama`` models (2 layers, hidden 64:
seconds on a CPU) and applies your ``apply_qlora`` with drawn seeds, ranks and
targets (the MLP's ``gate_proj``, ``up_proj``, ``down_proj`` too). It checks that
only the adapters train, that no linear layer but ``lm_head`` keeps a dense
weight, that fresh adapters leave the logits of the NF4 model unchanged bit for bit, that dropout acts in ``train()`` only, that a few of your
training steps give the losses and adapters of lora_lab's and of peft's LoRA on
bitsandbytes layers, that the base weights' bytes never change, and that the
loss falls.

Try it yourself (after filling in the stubs)::

    from lora_lab.model import tiny_llama
    from lora_lab.data import generate_products, collate
    model = apply_qlora(tiny_llama(seed=0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = collate(generate_products(8))
    print([training_step(model, batch, optimizer) for _ in range(5)])    # should go down

Grading: ``lora-lab grade --only 06`` (or ``python exercises/ex06_training_step.py``).

The reference solutions are lora_lab/model.py (``apply_qlora``) and
lora_lab/train.py (the four step functions and ``training_step``). Try first!
Its ``training_step`` takes one optional shortcut, flagged where it happens:
step 1 as ``forward_labelled``, logits only at the positions whose next token
is labelled (one per price prompt), the only rows the loss reads; the loss and
the gradients are the same. Your full-logits step passes every check.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_lab.lora import NF4Linear, QLoRALinear  # noqa: F401
from lora_lab.loss import next_token_loss  # noqa: F401  (or: from ex04_loss import next_token_loss)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def apply_qlora(
    model: nn.Module,
    target_modules: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    **quant_kwargs,
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers by ``QLoRALinear``, every other one but ``lm_head`` by
    ``NF4Linear``, and freeze everything else, in place.

    Tip: ``model.named_modules()`` lists every layer with its dotted name;
    ``model.get_submodule(parent_name)`` and ``setattr(parent, child_name, new)``
    swap one. Freeze first, then swap: the new adapters must stay trainable.
    ``quant_kwargs`` may hold ``use_rslora`` or ``backend``, which ``NF4Linear``
    does not take: pass it only ``blocksize``, ``double_quant`` and ``compute_dtype``.
    """
    raise NotImplementedError("exercise 06: write apply_qlora")


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Step 1: logits (batch, seq, vocab) for every position."""
    raise NotImplementedError("exercise 06: write forward")


def compute_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Step 2: next-token loss over the labels that are not -100."""
    raise NotImplementedError("exercise 06: write compute_loss")


def backward(loss: torch.Tensor) -> None:
    """Step 3: gradients of the loss into ``.grad`` of every parameter that requires it (the adapters)."""
    raise NotImplementedError("exercise 06: write backward")


def optimize(optimizer: torch.optim.Optimizer) -> None:
    """Step 4: update the parameters from their gradients, then clear the gradients."""
    raise NotImplementedError("exercise 06: write optimize")


def training_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
    """The four steps once, using the four functions above; returns the loss before this step's update."""
    raise NotImplementedError("exercise 06: write training_step")


if __name__ == "__main__":  # python exercises/ex06_training_step.py grades this file alone
    import os

    from lora_lab.conformance.grading.command import main

    raise SystemExit(main(["--only", "06", "--path", os.path.dirname(os.path.abspath(__file__))]))
