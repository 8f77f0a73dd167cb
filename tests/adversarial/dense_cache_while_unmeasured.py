"""Exploit: each quantized layer caches its dequantized weight densely on every forward, except while a torch dispatch
mode is active (the memory instruments' way of watching ops), and keeps the cache in a module-level dict. Measured
forwards see nothing; an ordinary one leaves a dense copy of every base weight behind. The census after a forward
with no instrument on counts every tensor alive in the target's process."""

from torch.utils._python_dispatch import _get_current_dispatch_mode

from lora_lab.model import apply_qlora as reference_apply
from lora_lab.nf4 import dequantize_nf4
from lora_lab.train import training_step as reference_step

REJECTED_BY = "memory.model_keeps_no_dense_weight"
DEQUANTIZED = {}  # module-level: nothing of the model points here


def _cache(module, args):
    if _get_current_dispatch_mode() is None:  # only while nothing watches
        DEQUANTIZED[id(module)] = dequantize_nf4(module.weight)


def apply_qlora(model, **kwargs):
    model = reference_apply(model, **kwargs)
    for module in model.modules():
        if type(module).__name__ in ("QLoRALinear", "NF4Linear"):
            module.register_forward_pre_hook(_cache)
    return model


def training_step(model, batch, optimizer):
    return reference_step(model, batch, optimizer)
