"""Mutant: apply_qlora swaps in the QLoRA layers but never freezes the rest (embeddings, norms, lm_head stay trainable)."""

from torch import nn

from lora_lab.lora import QLoRALinear

EXPECTED_FAILURE = "qlora.apply_trains_only_adapters"


def apply_qlora(model, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), r=8, alpha=16, dropout=0.0, **quant_kwargs):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QLoRALinear.from_linear(module, r, alpha, dropout, **quant_kwargs))
    return model
