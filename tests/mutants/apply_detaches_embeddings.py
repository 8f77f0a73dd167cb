"""Mutant: apply_qlora swaps in a fresh frozen copy of the embeddings, dropping the hook reentrant checkpointing needs.

transformers makes the embeddings' output require grad when checkpointing is
enabled (a hook on the embedding module); a new module has no hook, so with
reentrant checkpointing no input of a decoder block requires grad and the
adapters get none (transformers#26221). Without checkpointing nothing changes.
"""

import torch
from torch import nn

from lora_lab.model import apply_qlora as reference_apply_qlora
from lora_lab.train import training_step  # noqa: F401  (provided as is: the mistake is in apply_qlora)

EXPECTED_FAILURE = "training.gradient_checkpointing"


def apply_qlora(model, **kwargs):
    model = reference_apply_qlora(model, **kwargs)
    old = model.get_input_embeddings()
    fresh = nn.Embedding(old.num_embeddings, old.embedding_dim, padding_idx=old.padding_idx)
    with torch.no_grad():
        fresh.weight.copy_(old.weight)
    fresh.weight.requires_grad_(False)
    model.set_input_embeddings(fresh)
    return model
