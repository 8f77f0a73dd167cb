"""Mutant: the adapter path casts a bf16 x up to the fp32 adapters' dtype (as peft does), keeping an fp32 copy of x.

The result is as accurate or more; the copy doubles the activation memory of every adapted layer.
"""

import types

from lora_lab.lora import QLoRALinear, base_path, lora_path
from lora_lab.model import apply_qlora as reference_apply_qlora
from lora_lab.train import training_step  # noqa: F401  (provided as is: the mistake is in the layers)

EXPECTED_FAILURE = "memory.model_keeps_no_dense_weight"


def _forward(self, x):
    adapter = lora_path(x.to(self.lora_A.dtype), self.lora_A, self.lora_B, self.scaling)
    return base_path(x, self.weight, self.bias) + adapter.to(x.dtype)


def apply_qlora(model, **kwargs):
    model = reference_apply_qlora(model, **kwargs)
    for module in model.modules():
        if isinstance(module, QLoRALinear):
            module.forward = types.MethodType(_forward, module)
    return model
