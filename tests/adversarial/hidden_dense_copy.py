"""Exploit: apply_qlora keeps a hidden dense fp32 copy of every base weight beside its NF4 (8.7x the memory NF4 should
take), and computes from the copy; only a census of the tensors a model holds sees it."""

from lora_lab.model import apply_qlora as reference_apply
from lora_lab.train import training_step as reference_step

REJECTED_BY = "qlora.apply_holds_only_nf4"


def apply_qlora(model, **kwargs):
    dense = {name: m.weight.detach().clone() for name, m in model.named_modules() if hasattr(m, "in_features")}
    model = reference_apply(model, **kwargs)
    model._hidden_dense_weights = dense
    return model


def training_step(model, batch, optimizer):
    return reference_step(model, batch, optimizer)
