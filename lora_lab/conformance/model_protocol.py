"""How the suite reads a model: which modules carry adapters, which layers QLoRA quantizes.

The training properties (``properties/apply_qlora.py`` and ``properties/training.py``)
see a target's model only through these functions, so what counts as "an adapter"
or "a base linear layer" is defined once.
"""

from __future__ import annotations

import torch

from lora_lab.conformance.compare import UNIT_ROUNDOFF
from lora_lab.model import tiny_llama

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EVERY_LINEAR = (*ATTENTION, "gate_proj", "up_proj", "down_proj")  # every linear layer of a decoder block
DENSE_HEAD = "lm_head"  # the one linear layer real QLoRA (bitsandbytes load_in_4bit) leaves unquantized
U32 = UNIT_ROUNDOFF[torch.float32]
# Two decoder layers of fp32 matmuls (K <= 128) and a softmax: a few hundred roundings of 2^-24 each, at most.
MODEL_RTOL = 256 * U32


def apply_target(target, model, **kwargs):
    """Call the target's apply_qlora; an implementation that works in place and returns None is accepted."""
    result = target.op("apply_qlora")(model, **kwargs)
    return model if result is None else result


def adapted_modules(model) -> dict:
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "lora_B")}


def is_adapter_name(name: str) -> bool:
    return "lora_A" in name or "lora_B" in name


def seeded_apply(target, seed: int, **kwargs):
    """tiny_llama(seed) through the target's apply_qlora, with adapters drawn from a fixed RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return apply_target(target, tiny_llama(seed), **kwargs)


def model_logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def base_linear_names(model) -> list[str]:
    """Module paths of the model's linear layers that QLoRA quantizes: all of them but lm_head."""
    from torch import nn

    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] != DENSE_HEAD]
