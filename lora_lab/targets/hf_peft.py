"""transformers + bitsandbytes + peft as they come: a 4-bit model from ``BitsAndBytesConfig``, adapters from ``get_peft_model``.

``lora-lab verify lora_lab.targets.hf_peft --only qlora.apply training.`` runs the
training checks on the stack most people fine-tune with, with no wrapper of ours
around the model: the checks read the ``PeftModel`` through the behavioural model
protocol (``lora_lab.conformance.judge.model_protocol``).

Every line that is not a direct call of transformers, bitsandbytes or peft:

- ``apply_qlora`` saves the model it is given to a temporary folder, because
  ``BitsAndBytesConfig`` quantizes only while ``from_pretrained`` loads weights;
- ``apply_qlora`` refuses a blocksize other than 64 with a ValueError:
  ``BitsAndBytesConfig`` has no blocksize option (``Linear4bit`` always uses 64),
  and ``CAPABILITIES`` declares it so the suite draws only 64;
- ``training_step`` is the four steps as transformers' ``Trainer`` does them:
  ``model(**batch).loss`` (transformers shifts the labels), ``backward``,
  ``optimizer.step``, ``optimizer.zero_grad``, and ``loss.item()``.
"""

from __future__ import annotations

import tempfile

import torch
from torch import nn

LIBRARIES = ("transformers", "bitsandbytes", "peft")
CAPABILITIES = {"blocksizes": ((64,), "BitsAndBytesConfig has no blocksize option; Linear4bit always uses 64")}


def apply_qlora(model: nn.Module, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), r: int = 8, alpha: float = 16,
                dropout: float = 0.0, quantize_base: bool = True, blocksize: int = 64, double_quant: bool = True,
                compute_dtype: torch.dtype | None = None, use_rslora: bool = False) -> nn.Module:
    """``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))``, then ``get_peft_model``."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if blocksize != 64:
        raise ValueError(f"expected blocksize=64: BitsAndBytesConfig has no blocksize option, got {blocksize}")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=compute_dtype or model.dtype)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        quantized = AutoModelForCausalLM.from_pretrained(
            folder, dtype=model.dtype, quantization_config=config if quantize_base else None
        )
    lora = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
                           use_rslora=use_rslora)
    return peft.get_peft_model(quantized, lora)


def training_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
    """transformers' loss from ``labels``, backward, the optimizer's step, zero_grad; the loss before the update."""
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()
