"""The model protocol reads lora_lab's model and a PeftModel over bitsandbytes the same way."""

import pytest
import torch

from lora_lab.conformance.judge.model_protocol import (
    adapters,
    canonical_name,
    dense_linear_names,
    frozen_state,
    is_quantized,
    layer_weight,
    module_at,
    quantized_layer_names,
)
from lora_lab.model import apply_qlora, tiny_llama
from lora_lab.nf4 import quantize_nf4

LAYER0_Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def peft_model():
    from lora_lab.targets.hf_peft import apply_qlora as hf_apply

    return hf_apply(tiny_llama(0), target_modules=("q_proj", "v_proj"), r=4, alpha=8)


def test_peft_adapters_are_found_by_their_state_dict_names(peft_model):
    assert any(k.endswith(f"{LAYER0_Q}.lora_A.default.weight") for k in peft_model.state_dict())
    found = adapters(peft_model)
    assert sorted(found) == sorted(f"model.layers.{i}.self_attn.{t}" for i in (0, 1) for t in ("q_proj", "v_proj"))
    assert tuple(found[LAYER0_Q].lora_A.shape) == (4, 64) and tuple(found[LAYER0_Q].lora_B.shape) == (64, 4)
    assert found[LAYER0_Q].lora_A.requires_grad


def test_bitsandbytes_linear4bit_is_quantized_not_dense(peft_model):
    import bitsandbytes as bnb

    up = module_at(peft_model, "model.layers.0.mlp.up_proj")
    assert isinstance(up, bnb.nn.Linear4bit) and isinstance(up, torch.nn.Linear)  # a subclass of nn.Linear, yet 4-bit
    assert is_quantized(up.weight) and is_quantized(layer_weight(module_at(peft_model, LAYER0_Q)))
    assert dense_linear_names(peft_model) == []
    assert len(quantized_layer_names(peft_model)) == 2 * 7 and LAYER0_Q in quantized_layer_names(peft_model)
    assert not is_quantized(module_at(peft_model, "lm_head").weight)


def test_lora_lab_model_reads_the_same(peft_model):
    model = apply_qlora(tiny_llama(0), target_modules=("q_proj", "v_proj"), r=4, alpha=8)
    assert sorted(adapters(model)) == sorted(adapters(peft_model))
    assert quantized_layer_names(model) == quantized_layer_names(peft_model)
    assert len(dense_linear_names(tiny_llama(0))) == 2 * 7 and dense_linear_names(model) == []
    packed = [k for k in frozen_state(model) if k.endswith(".weight.packed")]
    assert len(packed) == 2 * 7, "NF4Tensor storage lives outside the state dict and must still be captured"
    assert not any("lora_" in k for k in frozen_state(model))


def test_names_and_weights_by_behaviour():
    assert canonical_name("base_model.model.model.layers.0.mlp.up_proj") == "model.layers.0.mlp.up_proj"
    assert canonical_name("model.layers.0") == "model.layers.0"
    assert is_quantized(quantize_nf4(torch.randn(64), 64)) and is_quantized(torch.zeros(4, dtype=torch.uint8))
    assert not is_quantized(torch.nn.Parameter(torch.randn(2, 2))) and not is_quantized(None)
