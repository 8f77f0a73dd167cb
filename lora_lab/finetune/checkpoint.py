"""Load a Hugging Face Llama checkpoint straight into NF4, one tensor (and one slice of rows) at a time.

    model = load_llama("/models/Llama-3.2-1B")                   # every linear but lm_head in NF4; LoRA on q/k/v/o
    model = load_llama(path, target_modules=("q_proj", "v_proj"), r=32, alpha=64, dtype=torch.bfloat16)
    tokenizer = load_tokenizer(path)                              # the checkpoint's own tokenizer.json

The obvious way, ``from_pretrained`` then ``apply_qlora``, first holds the
whole model in 16 or 32 bits, which is exactly the memory QLoRA is meant to
save: 16 GB for Llama 3.1 8B in bf16, where its NF4 weights take about 4.5 GB.
Here the model is built on the ``meta`` device (shapes only, no storage) and
filled from the ``*.safetensors`` shards:

- every linear weight but ``lm_head``'s (the targets ``q_proj`` ... and the
  rest, ``gate_proj`` ...) is read a slice of rows at a time and each slice is
  quantized as it arrives. Slices are cut on NF4 block boundaries, so the bytes
  equal quantizing the whole tensor; with double quantization the per-block
  scales are collected and quantized once at the end. Targets become
  ``QLoRALinear``, the others ``NF4Linear``;
- every other tensor (embeddings, norms, ``lm_head``) is copied into its own
  storage in ``dtype`` and frozen.

Each slice is read through a fresh ``safe_open``, so no memory-mapped shard
stays resident. Peak memory is therefore the final model (NF4 linears + the
dense rest) plus one slice, not the dense model. The result is what
``apply_qlora`` makes of the same weights, byte for byte.

Only local directories are read: nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from lora_lab.lora import NF4Linear, QLoRALinear
from lora_lab.model import DEFAULT_TARGETS, KEPT_DENSE, linear_names
from lora_lab.nf4 import NF4Tensor, quantize_absmax, quantize_nf4

SLICE_ELEMENTS = 1 << 20  # about 1M elements per read: bounds the transient memory of reading and quantizing
INDEX_NAME = "model.safetensors.index.json"
IGNORED_KEYS = ("rotary_emb.inv_freq",)  # older checkpoints saved this buffer; it is recomputed from the config


def checkpoint_files(path: str | os.PathLike) -> dict[str, Path]:
    """Which ``.safetensors`` file holds each tensor: from the index when the checkpoint is sharded."""
    from safetensors import safe_open

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"expected a Hugging Face model directory with config.json, got {path}")
    if (path / INDEX_NAME).is_file():
        weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
        return {key: path / file for key, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {', '.join(bins[:3])}: re-save it with save_pretrained(..., safe_serialization=True))" if bins else ""
        raise FileNotFoundError(f"expected *.safetensors weights in {path}{hint}")
    located = {}
    for file in files:
        with safe_open(file, "pt") as handle:
            located.update({key: file for key in handle.keys()})
    return located


def _read_rows(file: Path, key: str, start: int, stop: int, dtype: torch.dtype | None) -> torch.Tensor:
    """Rows ``start:stop`` of one stored tensor, copied into fresh memory (the file's mapping is closed after)."""
    from safetensors import safe_open

    with safe_open(file, "pt") as handle:
        rows = handle.get_slice(key)[start:stop]
        return rows.to(dtype=dtype or rows.dtype, copy=True)


def _tensor_shape(file: Path, key: str) -> list[int]:
    from safetensors import safe_open

    with safe_open(file, "pt") as handle:
        return handle.get_slice(key).get_shape()


def read_dense(file: Path, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One stored tensor in ``dtype`` (default: as stored), read a slice of rows at a time."""
    from safetensors import safe_open

    shape = _tensor_shape(file, key)
    if len(shape) < 2:  # norms, biases, scalars: small, read whole
        with safe_open(file, "pt") as handle:
            small = handle.get_tensor(key)
            return small.to(dtype=dtype or small.dtype, copy=True)
    first = _read_rows(file, key, 0, 1, dtype)
    out = torch.empty(shape, dtype=first.dtype)
    rows_per_slice = max(1, SLICE_ELEMENTS // math.prod(shape[1:]))
    for start in range(0, shape[0], rows_per_slice):
        out[start : start + rows_per_slice] = _read_rows(file, key, start, start + rows_per_slice, dtype)
    return out


def read_nf4(
    file: Path, key: str, blocksize: int = 64, double_quant: bool = True, dtype: torch.dtype | None = None
) -> NF4Tensor:
    """One stored 2-D weight quantized to NF4 slice by slice; the bytes equal ``quantize_nf4`` of the whole tensor.

    A slice holds a whole number of NF4 blocks (rows x columns is a multiple of
    ``blocksize``), so no block straddles two slices and only the last slice
    can end in a short block, as in the whole tensor.
    """
    shape = _tensor_shape(file, key)
    if len(shape) != 2:
        raise ValueError(f"expected {key} to be a 2-D linear weight, got shape {tuple(shape)}")
    rows, columns = shape
    rows_per_block = blocksize // math.gcd(columns, blocksize)  # fewest rows that hold whole blocks
    rows_per_slice = max(rows_per_block, SLICE_ELEMENTS // columns // rows_per_block * rows_per_block)
    packed, absmax, weight_dtype = [], [], None
    for start in range(0, rows, rows_per_slice):
        part = quantize_nf4(_read_rows(file, key, start, start + rows_per_slice, dtype), blocksize, double_quant=False)
        packed.append(part.packed)
        absmax.append(part.absmax)
        weight_dtype = part.dtype
    packed, absmax = torch.cat(packed), torch.cat(absmax)
    if not double_quant:
        return NF4Tensor(packed, absmax, blocksize, torch.Size(shape), weight_dtype)
    codes, code, scales, offset = quantize_absmax(absmax)
    return NF4Tensor(packed, codes, blocksize, torch.Size(shape), weight_dtype, True, code, scales, offset)


def _place(model: nn.Module, key: str, tensor: torch.Tensor, trainable: bool) -> bool:
    """Put ``tensor`` where ``key`` names in the model (as a Parameter or buffer); False if the model has no such slot."""
    module_name, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(tensor, requires_grad=trainable)
    elif name in module._buffers:
        module._buffers[name] = tensor
    else:
        return False
    return True


def _rebuild_meta_buffers(model: nn.Module) -> None:
    """Recompute buffers that checkpoints never store (the rotary embedding's inverse frequencies) on the CPU."""
    for name, module in list(model.named_modules()):
        on_meta = any(buffer.is_meta for buffer in module.buffers(recurse=False))
        if on_meta and type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "config"):
            parent, _, child = name.rpartition(".")
            with torch.device("cpu"):
                setattr(model.get_submodule(parent) if parent else model, child, type(module)(config=module.config))


def load_llama(
    path: str | os.PathLike,
    quantize: bool = True,
    target_modules: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    use_rslora: bool = False,
    blocksize: int = 64,
    double_quant: bool = True,
    dtype: torch.dtype | None = None,
    backend: str = "reference",
    quantize_base: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """A ``LlamaForCausalLM`` from a local checkpoint directory, in eval mode.

    With ``quantize`` (the default) the ``target_modules`` become
    ``QLoRALinear`` layers (NF4 weight read and quantized slice by slice, fresh
    adapters with B = 0), with ``quantize_base`` every other linear layer but
    ``lm_head`` becomes an ``NF4Linear`` (read the same way), and every other
    parameter is frozen: the same model as ``apply_qlora(from_pretrained(path),
    ...)`` without ever holding the dense linear weights. With ``quantize=False`` it is the plain dense model (every
    parameter trainable, as ``from_pretrained`` gives it), loaded the same
    tensor-at-a-time way. ``dtype`` converts the stored tensors (default: keep
    them as stored); the NF4 weights dequantize to it. ``compute_dtype`` is
    ``apply_qlora``'s: what the quantized layers compute in.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    located = checkpoint_files(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    targets = set((target_modules,) if isinstance(target_modules, str) else target_modules) if quantize else set()
    missing_targets = sorted(targets - set(linear_names(model)))
    if missing_targets:
        raise ValueError(
            f"target module(s) {', '.join(missing_targets)} match no nn.Linear in {path}; its linear layers are "
            f"named {', '.join(linear_names(model))}"
        )
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    target_paths = [name for name in linears if name.rsplit(".", 1)[-1] in targets]
    base_paths = [  # the linear layers frozen in NF4 without adapters
        name for name in linears
        if quantize and quantize_base and name not in target_paths and name.rsplit(".", 1)[-1] not in KEPT_DENSE
    ]
    quantized_paths = set(target_paths) | set(base_paths)
    if config.tie_word_embeddings and "lm_head" in targets:
        raise ValueError("lm_head shares its weight with the input embeddings in this model; leave it out of target_modules")
    nf4_weights: dict[str, NF4Tensor] = {}
    nf4_biases: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, file in located.items():
        module_name, _, name = key.rpartition(".")
        if module_name in quantized_paths and name == "weight":
            nf4_weights[module_name] = read_nf4(file, key, blocksize, double_quant, dtype)
        elif module_name in quantized_paths and name == "bias":
            nf4_biases[module_name] = read_dense(file, key, dtype)
        elif not key.endswith(IGNORED_KEYS) and not _place(model, key, read_dense(file, key, dtype), trainable=not quantize):
            unexpected.append(key)
    if unexpected:
        warnings.warn(f"{path}: ignored {len(unexpected)} tensor(s) this model has no place for: {', '.join(unexpected[:5])}",
                      stacklevel=2)
    for name in [*target_paths, *base_paths]:  # targets first, in module order: the adapters' random start is apply_qlora's
        if name not in nf4_weights:
            why = "target_modules asks to quantize" if name in target_paths else "QLoRA quantizes (quantize_base)"
            raise ValueError(f"{path} has no tensor {name}.weight, which {why}")
        parent, _, child = name.rpartition(".")
        weight, bias = nf4_weights.pop(name), nf4_biases.pop(name, None)
        if name in target_paths:
            layer = QLoRALinear(weight, bias, r, alpha, dropout, use_rslora, backend, compute_dtype=compute_dtype)
        else:
            layer = NF4Linear(weight, bias, compute_dtype)
        setattr(model.get_submodule(parent), child, layer)
    output, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if config.tie_word_embeddings and output is not None and output.weight.is_meta:
        output.weight = embeddings.weight
    _rebuild_meta_buffers(model)
    missing = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensor(s) the model needs: {', '.join(missing[:5])}")
    return model.eval()


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's own tokenizer (``tokenizer.json`` and its config), from the local directory only."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"{path} has no tokenizer (tokenizer.json); copy the tokenizer files of the base model into it, "
            "e.g. AutoTokenizer.from_pretrained(base).save_pretrained(path), or for lora_lab's tiny Llama: "
            "lora_lab.data.get_tokenizer().save_pretrained(path)"
        )
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------------------- measuring it
# ``python -m lora_lab.finetune.checkpoint PATH`` loads a checkpoint in a fresh process and reports the peak resident
# memory (Linux VmHWM, reset just before loading) above what the process held before.


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measure_load(path: str | os.PathLike, dense: bool = False, target_modules: tuple[str, ...] = DEFAULT_TARGETS) -> dict:
    """Peak resident memory of loading ``path`` (Linux only), the way lora_lab does it or the dense way.

    It counts everything the process touches: tensors, Python objects,
    allocator slack and any mapped file pages. The peak is reset (``clear_refs``)
    after the libraries are imported and warmed up, so imports are not counted.
    """
    import gc

    from transformers import AutoModelForCausalLM

    from lora_lab.model import apply_qlora

    def load():
        if dense:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype="auto")
            return apply_qlora(model, target_modules=target_modules)
        return load_llama(path, target_modules=target_modules)

    with torch.device("meta"):  # warm up: import the model classes and build one, with no storage ...
        AutoModelForCausalLM.from_config(__import__("transformers").AutoConfig.from_pretrained(path, local_files_only=True))
    quantize_nf4(torch.ones(64, 64), double_quant=True)  # ... and build NF4's one-time lookup tables (about 130 MB at their peak)
    gc.collect()
    before = _memory_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass  # not allowed here: the peak then includes anything before, so it can only be over-stated
    model = load()
    peak = _memory_kib("VmHWM")
    held = _memory_kib("VmRSS") - before
    stored = sum(read.numel() * read.element_size() for read in [*model.parameters(), *model.buffers()])
    nf4 = sum(layer.weight.nbytes for layer in model.modules() if isinstance(layer, NF4Linear))  # QLoRALinear's too
    return {
        "path": str(path), "how": "from_pretrained + apply_qlora" if dense else "load_llama",
        "peak_rss_increase_bytes": (peak - before) * 1024, "held_after_bytes": held * 1024,
        "model_bytes": stored + nf4, "nf4_bytes": nf4,
        "checkpoint_bytes": sum(p.stat().st_size for p in set(checkpoint_files(path).values())),
    }


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m lora_lab.finetune.checkpoint", description=measure_load.__doc__)
    parser.add_argument("path", help="a local Hugging Face Llama directory (config.json + *.safetensors)")
    parser.add_argument("--also-dense", action="store_true", help="then measure from_pretrained + apply_qlora too")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated target modules")
    options = parser.parse_args()
    targets = tuple(options.targets.split(","))
    reports = [measure_load(options.path, False, targets)]
    if options.also_dense:
        __import__("gc").collect()
        reports.append(measure_load(options.path, True, targets))
    print(json.dumps(reports, indent=2))
    sys.exit(0)
