"""Mutant: apply_qlora casts the adapters to the model's dtype: in a bf16 model most of AdamW's lr 1e-4 updates of
lora_A round away."""

import torch

from lora_lab.lora import QLoRALinear
from lora_lab.model import DEFAULT_TARGETS
from lora_lab.model import apply_qlora as reference_apply
from lora_lab.train import training_step  # noqa: F401  (the step itself is right)

EXPECTED_FAILURE = "qlora.apply_trains_only_adapters"


def apply_qlora(model, target_modules=DEFAULT_TARGETS, r=8, alpha=16, dropout=0.0, **quant_kwargs):
    dtype = next(model.parameters()).dtype
    reference_apply(model, target_modules, r=r, alpha=alpha, dropout=dropout, **quant_kwargs)
    for module in model.modules():
        if isinstance(module, QLoRALinear):
            with torch.no_grad():
                module.lora_A.data = module.lora_A.data.to(dtype)
                module.lora_B.data = module.lora_B.data.to(dtype)
    return model
