"""The model, the loss, the optimizer and the training step: what the conformance suite does not cover.

(The suite's properties of next_token_loss, adamw_step, apply_qlora and
training_step run on lora_lab in tests/conformance/test_properties.py.)
"""

import pytest
import torch

from lora_lab.data import VOCAB_SIZE, collate, generate_products
from lora_lab.finetune.base_model import pretrained_tiny_llama
from lora_lab.lora import NF4Linear, QLoRALinear
from lora_lab.model import PRESETS, ModelPreset, apply_qlora, linear_names, tiny_llama, trainable_summary
from lora_lab.optim import AdamW, adamw_step
from lora_lab.train import compute_loss, forward, training_step


def test_presets_have_the_real_models_shapes():
    llama8b = ModelPreset.from_name("llama-3.1-8b")
    assert (llama8b.hidden, llama8b.intermediate, llama8b.layers, llama8b.heads, llama8b.kv_heads, llama8b.vocab) == (
        4096, 14336, 32, 32, 8, 128256,
    )
    assert ModelPreset.from_name("llama-3.2-1b").tie_embeddings
    tiny = ModelPreset.from_name("tiny")
    assert tiny.vocab == VOCAB_SIZE and tiny.hidden % 64 == 0 and tiny.intermediate % 64 == 0
    with pytest.raises(ValueError, match="llama-3.1-8b, llama-3.2-1b, tiny"):
        ModelPreset.from_name("llama-2")
    assert set(PRESETS) == {"llama-3.1-8b", "llama-3.2-1b", "tiny"}


def test_tiny_llama_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = tiny_llama(0), tiny_llama(0), tiny_llama(1)
    assert torch.equal(torch.rand(3), expected_draw)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert tiny_llama(0, num_hidden_layers=1).config.num_hidden_layers == 1


def test_apply_qlora_replaces_targets_and_summarises_what_trains():
    model = apply_qlora(tiny_llama(0), target_modules=("q_proj", "v_proj"), r=4, alpha=8)
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    assert len(layers) == 2 * model.config.num_hidden_layers
    assert all(m.scaling == 2 and m.weight.double_quant and m.weight.blocksize == 64 for m in layers)
    summary = trainable_summary(model)
    assert summary.trainable == 2 * (4 * (64 + 64) + 4 * (64 + 32))  # per layer: q (64x64) and v (32x64)
    assert summary.adapter_bytes == 4 * summary.trainable
    assert 0 < summary.share < 0.05 and "trainable parameters" in str(summary)
    assert trainable_summary(apply_qlora(tiny_llama(0))).trainable == 7168  # the demo's r=8 on q, k, v, o
    # QLoRA quantizes the whole base: every other linear but lm_head is NF4 too, frozen, without adapters.
    base = [m for m in model.modules() if isinstance(m, NF4Linear) and not isinstance(m, QLoRALinear)]
    assert len(base) == 5 * model.config.num_hidden_layers  # k, o, gate, up, down
    assert all(m.weight.double_quant and m.weight.blocksize == 64 for m in base)
    assert linear_names(model) == ["lm_head"] and not any(p.requires_grad for m in base for p in m.parameters())
    assert summary.total == sum(p.numel() for p in tiny_llama(0).parameters()) + summary.trainable
    dense_mlp = apply_qlora(tiny_llama(0), target_modules=("q_proj", "v_proj"), r=4, quantize_base=False)
    assert linear_names(dense_mlp) == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "up_proj"]
    assert trainable_summary(dense_mlp).total == summary.total


def test_apply_qlora_names_the_layers_that_exist_when_a_target_is_wrong():
    with pytest.raises(ValueError, match="qkv.*down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        apply_qlora(tiny_llama(0), target_modules=("q_proj", "qkv"))
    assert linear_names(apply_qlora(tiny_llama(0), target_modules="lm_head", quantize_base=False)) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj",
    ]
    assert linear_names(apply_qlora(tiny_llama(0), target_modules="lm_head")) == []  # the rest went to NF4 too


def test_training_step_is_the_four_steps_and_both_optimizers_agree():
    """lora_lab.optim.AdamW and torch.optim.AdamW give bit-identical trajectories (CPU, single-tensor path)."""
    batch = collate(generate_products(3, seed=5))
    trajectories = []
    for optimizer_class in (AdamW, torch.optim.AdamW):
        torch.manual_seed(0)
        model = apply_qlora(tiny_llama(0))
        optimizer = optimizer_class([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        with torch.no_grad():
            first = compute_loss(forward(model, batch), batch["labels"]).item()
        losses = [training_step(model, batch, optimizer) for _ in range(4)]
        assert losses[0] == first and losses[-1] < losses[0]
        assert all(p.grad is None for p in model.parameters())
        trajectories.append((losses, [p.detach().clone() for p in model.parameters() if p.requires_grad]))
    assert trajectories[0][0] == trajectories[1][0]
    assert all(torch.equal(a, b) for a, b in zip(trajectories[0][1], trajectories[1][1]))


def test_adamw_rejects_a_step_counted_from_zero_and_bad_hyperparameters():
    p = torch.zeros(3)
    with pytest.raises(ValueError, match="counting from 1"):
        adamw_step(p, torch.ones(3), torch.zeros(3), torch.zeros(3), 0)
    with pytest.raises(ValueError):
        AdamW([torch.zeros(2, requires_grad=True)], lr=-1)


def test_pretrained_base_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_LAB_CACHE", str(tmp_path))
    model, path, cached = pretrained_tiny_llama(seed=0, steps=3)
    assert not cached and path.exists() and path.parent == tmp_path
    again, same_path, cached = pretrained_tiny_llama(seed=0, steps=3)
    assert cached and same_path == path
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(model.lm_head.weight, tiny_llama(0).lm_head.weight)  # it did train
    assert pretrained_tiny_llama(seed=0, steps=4)[1] != path  # another recipe, another file
