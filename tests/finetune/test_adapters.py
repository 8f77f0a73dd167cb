"""Adapters in peft's format: lora_lab -> peft and peft -> lora_lab give the same logits, and mismatches are refused.

The comparison isolates the adapters. lora_lab's model holds NF4 weights (every
linear layer but lm_head); peft runs either on a dense transformers model whose
linear weights ARE those NF4 weights dequantized (fp32, so both sides compute F.linear with the same
matrix), or on bitsandbytes ``Linear4bit`` layers holding the same NF4 bytes,
kept in train mode (bitsandbytes' CPU eval path re-packs and rounds in bf16).
The only thing that differs between the two models is who wrote the adapter,
and the arithmetic is the same (F.linear for the base, x A^T B^T * scaling for
the adapter), so the logits must be equal bit for bit.
"""

import copy
import json

import pytest
import torch

from lora_lab.conformance.judge.model_protocol import model_logits
from lora_lab.finetune.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter, qlora_layers, save_adapter
from lora_lab.lora import NF4Linear
from lora_lab.model import apply_qlora, tiny_llama

TARGETS = ("q_proj", "v_proj", "down_proj")


def _qlora_model(r=4, alpha=8, targets=TARGETS, seed=0):
    torch.manual_seed(seed)
    model = apply_qlora(tiny_llama(0), target_modules=targets, r=r, alpha=alpha)
    return model.eval()


def _randomize_adapters(model, seed=1):
    """B starts at zero, which would make any adapter look right: give A and B random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in qlora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
    return model


def _nf4_layers(qmodel) -> dict:
    """Every layer holding an NF4 weight: the targets (QLoRALinear) and the rest of the base (NF4Linear)."""
    return {name: m for name, m in qmodel.named_modules() if isinstance(m, NF4Linear)}


def _dense_twin(qmodel):
    """A plain transformers model whose linear weights are qmodel's NF4 weights, dequantized (lm_head stays dense)."""
    dense = tiny_llama(0)
    with torch.no_grad():
        for name, layer in _nf4_layers(qmodel).items():
            dense.get_submodule(name).weight.copy_(layer.weight.dequantize())
    return dense.eval()


def _bnb_twin(qmodel):
    """A transformers model whose linear layers (lm_head aside) are bitsandbytes Linear4bit holding qmodel's NF4 bytes."""
    from lora_lab.conformance.judge.oracles import bnb_linear4bit

    model = tiny_llama(0)
    for name, layer in _nf4_layers(qmodel).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, bnb_linear4bit(layer.weight, layer.bias))
    return model


_logits = torch.no_grad()(model_logits)  # every position's logits, without building a graph


def test_saved_files_are_in_peft_format(tmp_path):
    model = _randomize_adapters(_qlora_model(r=4, alpha=8))
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="meta-llama/Llama-3.2-1B")
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / WEIGHTS_NAME, "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").shape == (4, 64)
        assert f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight").shape == (64, 4)
    assert len(keys) == 2 * 3 * 2  # A and B, 3 targets, 2 layers
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, False)
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "meta-llama/Llama-3.2-1B"


@pytest.mark.parametrize("peft_base", ["dense dequantized NF4", "bitsandbytes Linear4bit"])
def test_lora_lab_adapter_loads_in_peft_with_the_same_logits(tmp_path, batch, peft_base):
    import peft

    model = _randomize_adapters(_qlora_model())
    save_adapter(model, tmp_path / "adapter")
    base = _dense_twin(model) if peft_base.startswith("dense") else _bnb_twin(model)
    with torch.no_grad():
        no_adapter = _logits(base, batch)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    if peft_base.startswith("dense"):
        peft_model.eval()
    else:
        peft_model.train()  # bitsandbytes' exact CPU path; dropout is 0 and Llama's attention dropout is 0
    expected, got = _logits(model, batch), _logits(peft_model, batch)
    assert (expected - no_adapter).abs().max() > 1e-2  # the adapter matters ...
    assert torch.equal(got, expected)  # ... and both stacks apply it with the same arithmetic, bit for bit


def test_peft_adapter_loads_into_lora_lab_with_the_same_logits(tmp_path, batch):
    import peft

    model = _qlora_model(r=4, alpha=8)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(_dense_twin(model), config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(tmp_path / "from_peft")
    load_adapter(model, tmp_path / "from_peft")
    assert torch.equal(_logits(model, batch), _logits(peft_model.eval(), batch))


def test_round_trip_through_files_is_bit_exact(tmp_path, batch):
    source = _randomize_adapters(_qlora_model())
    save_adapter(source, tmp_path / "a")
    target = load_adapter(_qlora_model(seed=5), tmp_path / "a")
    for (name, a), b in zip(qlora_layers(source).items(), qlora_layers(target).values()):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B), name
    assert torch.equal(_logits(source, batch), _logits(target, batch))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: _qlora_model(r=8, alpha=16), r"rank r=4 but model.layers.0.self_attn.q_proj has r=8"),
        (lambda: _qlora_model(alpha=32), r"scaling is 2 \(lora_alpha=8, r=4.*uses 8; call apply_qlora\(model, r=4, alpha=8"),
        (
            lambda: _qlora_model(targets=("q_proj", "v_proj")),
            r"targets down_proj, q_proj, v_proj but the model's .* are q_proj, v_proj",
        ),
        (
            lambda: apply_qlora(tiny_llama(0, intermediate_size=192), target_modules=TARGETS, r=4, alpha=8),
            r"model.layers.0.mlp.down_proj.lora_A: expected shape \(4, 192\) for this model, the adapter has \(4, 128\)",
        ),
        (lambda: apply_qlora(tiny_llama(0, num_hidden_layers=3), target_modules=TARGETS, r=4, alpha=8),
         r"3 without weights in the adapter \(model.layers.2"),
        (lambda: tiny_llama(0), "expected a model with QLoRALinear layers"),
    ],
)
def test_mismatches_are_refused_before_anything_is_copied(tmp_path, build, message):
    save_adapter(_randomize_adapters(_qlora_model()), tmp_path / "a")
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_adapter(model, tmp_path / "a")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_non_empty_directory_is_not_overwritten_without_asking(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("mine")
    model = _qlora_model()
    with pytest.raises(FileExistsError, match=r"already holds files \(notes.txt\); pass overwrite=True"):
        save_adapter(model, tmp_path / "a")
    save_adapter(model, tmp_path / "a", overwrite=True)
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine" and (tmp_path / "a" / WEIGHTS_NAME).exists()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, "notes.txt"]


def test_unsupported_peft_features_and_missing_files_are_named(tmp_path):
    model = _qlora_model()
    with pytest.raises(FileNotFoundError, match="expected adapter_config.json and adapter_model.safetensors"):
        load_adapter(model, tmp_path)
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True, which lora_lab's QLoRALinear does not support"):
        load_adapter(model, tmp_path / "a")
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type 'IA3'"):
        load_adapter(copy.deepcopy(model), tmp_path / "a")
