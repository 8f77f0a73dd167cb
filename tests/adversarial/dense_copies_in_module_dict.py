"""Exploit: apply_qlora keeps a dense copy of every base weight in a module-level dict, out of the model's reach, so
that a census of what the model holds finds only NF4. The census counts every tensor alive in the target's process
after apply_qlora, wherever it is kept."""

from lora_lab.model import apply_qlora as reference_apply
from lora_lab.train import training_step as reference_step

REJECTED_BY = "qlora.apply_holds_only_nf4"
DENSE_WEIGHTS = {}  # module-level: nothing of the model points here


def apply_qlora(model, **kwargs):
    for name, module in model.named_modules():
        if hasattr(module, "in_features"):
            DENSE_WEIGHTS[(id(model), name)] = module.weight.detach().clone()
    return reference_apply(model, **kwargs)


def training_step(model, batch, optimizer):
    return reference_step(model, batch, optimizer)
