"""load_llama: a checkpoint on disk becomes the same QLoRA model apply_qlora makes in memory, without the dense peak.

Checkpoints are written here with transformers' own save_pretrained (one file,
and sharded with an index), so the file layout is the real one.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from lora_lab.conformance.judge.model_protocol import model_logits
from lora_lab.finetune.adapters import qlora_layers
from lora_lab.finetune.checkpoint import checkpoint_files, load_llama, load_tokenizer, read_nf4
from lora_lab.lora import NF4Linear
from lora_lab.model import apply_qlora, tiny_llama
from lora_lab.nf4 import quantize_nf4

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SOME_LINEAR = ("q_proj", "v_proj", "down_proj")  # the other linear layers (lm_head aside) become NF4Linear


def _save(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


_logits = torch.no_grad()(model_logits)  # every position's logits, without building a graph


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_load_llama_equals_apply_qlora_on_the_same_weights(tmp_path, batch, sharded, dtype):
    path = _save(tiny_llama(0), tmp_path / "ckpt", **({"max_shard_size": "100KB"} if sharded else {}))
    assert (path / "model.safetensors.index.json").exists() == sharded
    from transformers import AutoModelForCausalLM

    # The in-memory model, as transformers loads it (in bf16 that keeps the rotary frequencies in fp32, as load_llama does).
    reference = tiny_llama(0) if dtype is None else AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    torch.manual_seed(0)
    apply_qlora(reference, target_modules=SOME_LINEAR, r=4, alpha=8)
    torch.manual_seed(0)
    loaded = load_llama(path, target_modules=SOME_LINEAR, r=4, alpha=8, dtype=dtype)
    expected, got = qlora_layers(reference), qlora_layers(loaded)
    assert list(expected) == list(got)
    for name, layer in expected.items():
        assert torch.equal(layer.lora_A, got[name].lora_A)  # same seed, same module order: same random start
    nf4_layers = lambda m: {n: (type(x), x.weight) for n, x in m.named_modules() if isinstance(x, NF4Linear)}  # noqa: E731
    expected, got = nf4_layers(reference), nf4_layers(loaded)
    assert list(expected) == list(got) and len(expected) == 7 * reference.config.num_hidden_layers  # every linear but lm_head
    for name, (kind, weight) in expected.items():
        assert got[name][0] is kind, name  # QLoRALinear on the targets, NF4Linear on the rest
        for field in ("packed", "absmax", "absmax_scale"):
            assert torch.equal(getattr(weight, field), getattr(got[name][1], field)), (name, field)
        assert got[name][1].dtype == weight.dtype and got[name][1].absmax_offset == weight.absmax_offset
    assert type(loaded.lm_head) is torch.nn.Linear
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(loaded) == trainable(reference) and all("lora_" in n for n in trainable(loaded))
    reference.eval()
    assert torch.equal(_logits(loaded, batch), _logits(reference, batch))
    assert loaded.config.name_or_path == str(path)


@pytest.mark.parametrize("shape, blocksize", [((37, 100), 64), ((96, 64), 64), ((5, 1000), 256), ((40, 48), 32)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantizing_slice_by_slice_gives_the_bytes_of_the_whole_tensor(tmp_path, monkeypatch, shape, blocksize, double_quant):
    from safetensors.torch import save_file

    import lora_lab.finetune.checkpoint

    monkeypatch.setattr(lora_lab.finetune.checkpoint, "SLICE_ELEMENTS", 300)  # many slices, some holding a single block row
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(torch.bfloat16)
    save_file({"w": weight}, tmp_path / "w.safetensors")
    got = read_nf4(tmp_path / "w.safetensors", "w", blocksize, double_quant)
    expected = quantize_nf4(weight, blocksize, double_quant)
    assert torch.equal(got.packed, expected.packed) and torch.equal(got.absmax, expected.absmax)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    assert torch.equal(got.dequantize(), expected.dequantize())


def test_tied_embeddings_and_the_dense_option(tmp_path, batch):
    from transformers import AutoModelForCausalLM

    path = _save(tiny_llama(0, tie_word_embeddings=True), tmp_path / "tied")
    assert "lm_head.weight" not in checkpoint_files(path)
    loaded = load_llama(path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    dense = load_llama(path, quantize=False)
    assert not qlora_layers(dense) and all(p.requires_grad for p in dense.parameters())
    reference = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    assert torch.equal(_logits(dense, batch), _logits(reference, batch))
    with pytest.raises(ValueError, match="lm_head shares its weight with the input embeddings"):
        load_llama(path, target_modules=("q_proj", "lm_head"))


def test_bad_checkpoints_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a Hugging Face model directory with config.json"):
        load_llama(tmp_path)
    path = _save(tiny_llama(0), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="qkv match no nn.Linear .* named down_proj, gate_proj"):
        load_llama(path, target_modules=("q_proj", "qkv"))
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        load_tokenizer(path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="found pytorch_model.bin: re-save it with save_pretrained"):
        load_llama(path)
    from safetensors.torch import load_file, save_file

    (path / "pytorch_model.bin").rename(path / "model.safetensors")
    tensors = load_file(path / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks 1 tensor.* model.norm.weight"):
        load_llama(path)


def test_peak_memory_stays_near_the_quantized_size(tmp_path):
    """Peak resident memory of loading, measured in a fresh process (Linux VmHWM, reset after imports).

    It counts everything the process touches (tensors, Python objects,
    allocator slack, mapped file pages). glibc is told to return freed blocks
    to the system (a fixed mmap threshold) so that RSS follows live memory;
    with its default adaptive threshold the same load peaks at about 35-45 MB
    here instead of about 26 MB, still well under the 89 MB of fp32 weights.
    The same process then loads the dense way, from_pretrained + apply_qlora,
    to show that the measurement does see a dense model when there is one.
    """
    model = tiny_llama(0, hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=8)
    path = _save(model, tmp_path / "wide", max_shard_size="20MB")
    del model
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lora_lab.finetune.checkpoint", str(path), "--also-dense", "--targets", ",".join(ALL_LINEAR)]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    streamed, dense = json.loads(run.stdout)
    checkpoint = streamed["checkpoint_bytes"]  # 89 MB of fp32 weights
    assert streamed["how"] == "load_llama" and dense["how"] == "from_pretrained + apply_qlora"
    assert streamed["model_bytes"] < 0.25 * checkpoint  # NF4 targets + fp32 embeddings and norms: about 18 MB
    assert streamed["peak_rss_increase_bytes"] < 0.5 * checkpoint, streamed
    assert dense["peak_rss_increase_bytes"] > checkpoint, dense
