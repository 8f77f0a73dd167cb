"""Adapters on disk, in peft's format, so a lora_lab run and the Hugging Face stack can trade them.

    save_adapter(model, "runs/price/adapter")     # adapter_model.safetensors + adapter_config.json
    peft.PeftModel.from_pretrained(base, "runs/price/adapter")   # ...loads in peft, on a plain transformers model
    load_adapter(model, "someone/else/adapter")  # ...and a peft-written adapter loads into a lora_lab model

The adapters are the whole result of QLoRA fine-tuning: a few megabytes next to
a base model of gigabytes. peft stores them as two files:

- ``adapter_model.safetensors``: for every adapted layer two tensors, named
  ``base_model.model.<layer>.lora_A.weight`` (r x K) and ``...lora_B.weight``
  (N x r), where ``<layer>`` is the module path inside the transformers model
  (``model.layers.0.self_attn.q_proj``) and ``base_model.model.`` is the path
  of that model inside a ``PeftModel``;
- ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``,
  ``target_modules``, ``use_rslora`` (which together fix the scaling
  alpha/r or alpha/sqrt(r)), dropout, and what the adapter was trained on.

The base weights are not in either file. An adapter only means something on the
base it was trained with, so ``load_adapter`` checks every name, rank, shape and
scaling against the model before it copies anything, and says what it expected.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from lora_lab.lora import QLoRALinear, lora_scaling

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
KEY_PREFIX = "base_model.model."  # where the transformers model sits inside a peft PeftModel
SUPPORTED_KEYS = ("lora_A.weight", "lora_B.weight")
# peft features that change what the tensors mean; lora_lab's QLoRALinear has none of them.
UNSUPPORTED = {
    "use_dora": (False, None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_qalora": (False, None),
    "lora_bias": (False, None),
}


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (FSDP2 shards in place, so it needs no unwrapping)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def qlora_layers(model: nn.Module) -> dict[str, QLoRALinear]:
    """Every ``QLoRALinear`` of the model by its module path, in module order."""
    return {name: module for name, module in _unwrap(model).named_modules() if isinstance(module, QLoRALinear)}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A whole, contiguous CPU copy (FSDP2 parameters are sharded DTensors: gather them first)."""
    whole = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return whole.detach().to("cpu").contiguous().clone()


def _one_value(layers: dict[str, QLoRALinear], attribute: str):
    values = {getattr(layer, attribute) for layer in layers.values()}
    if len(values) != 1:
        raise ValueError(
            f"expected every adapted layer to share one {attribute} (peft's adapter_config.json holds one), "
            f"got {sorted(values)}"
        )
    return values.pop()


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """The ``adapter_config.json`` peft writes for these adapters (the fields peft reads to rebuild them)."""
    layers = qlora_layers(model)
    if not layers:
        raise ValueError("expected a model with QLoRALinear layers; call apply_qlora (or load_llama) first")
    dropouts = {layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0 for layer in layers.values()}
    if base_model_name_or_path is None:
        config = getattr(_unwrap(model), "config", None)
        base_model_name_or_path = getattr(config, "name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "r": _one_value(layers, "r"),
        "lora_alpha": _one_value(layers, "alpha"),
        "use_rslora": _one_value(layers, "use_rslora"),
        "lora_dropout": max(dropouts),
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "revision": None,
    }


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the model's adapters to ``directory`` in peft's format; returns the directory.

    ``base_model_name_or_path`` goes into the config (default: the model
    config's ``name_or_path``, which ``load_llama`` sets to the checkpoint's
    folder). A non-empty directory is refused unless ``overwrite=True``, so a
    finished run is never replaced by accident. Both files are written to
    temporary names and renamed, so a crash never leaves half a file.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file; expected a directory for the adapter files")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        held = ", ".join(sorted(p.name for p in directory.iterdir())[:5])
        raise FileExistsError(
            f"{directory} already holds files ({held}); pass overwrite=True to replace the adapter, or choose an empty directory"
        )
    config = adapter_config(model, base_model_name_or_path)
    tensors = {}
    for name, layer in qlora_layers(model).items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = _full(layer.lora_A)
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = _full(layer.lora_B)
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{WEIGHTS_NAME}.{os.getpid()}.tmp"
    save_file(tensors, partial, metadata={"format": "pt"})
    os.replace(partial, directory / WEIGHTS_NAME)
    partial = directory / f".{CONFIG_NAME}.{os.getpid()}.tmp"
    partial.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(partial, directory / CONFIG_NAME)
    return directory


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """``(config, {layer path: {"lora_A": tensor, "lora_B": tensor}})`` from a peft adapter directory."""
    from safetensors.torch import load_file

    directory = Path(directory)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / name).is_file()]
    if missing:
        hint = " (peft's older adapter_model.bin is not read; re-save it with safe_serialization=True)" if (
            directory / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"expected {' and '.join(missing)} in {directory}{hint}")
    config = json.loads((directory / CONFIG_NAME).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"expected a LoRA adapter (peft_type 'LORA'), got peft_type {config.get('peft_type')!r}")
    for field, allowed in UNSUPPORTED.items():
        if config.get(field, allowed[0]) not in allowed:
            raise ValueError(f"this adapter sets {field}={config[field]!r}, which lora_lab's QLoRALinear does not support")
    if config.get("bias", "none") != "none":
        raise ValueError(f"expected an adapter that trains no biases (bias 'none'), got bias {config['bias']!r}")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(directory / WEIGHTS_NAME).items():
        body = key.removeprefix(KEY_PREFIX)
        suffix = next((s for s in SUPPORTED_KEYS if body.endswith("." + s)), None)
        if not key.startswith(KEY_PREFIX) or suffix is None:
            raise ValueError(
                f"unexpected tensor {key!r} in {directory / WEIGHTS_NAME}; expected only "
                f"'{KEY_PREFIX}<layer>.lora_A.weight' and '...lora_B.weight' (plain LoRA, no DoRA or saved modules)"
            )
        layers.setdefault(body[: -len(suffix) - 1], {})[suffix.split(".")[0]] = tensor
    return config, layers


def _check_targets(config: dict, layers: dict[str, QLoRALinear], stored: dict[str, dict[str, torch.Tensor]]) -> None:
    model_targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    targets = config.get("target_modules")
    if isinstance(targets, list) and sorted(set(targets)) != model_targets:
        raise ValueError(
            f"the adapter targets {', '.join(sorted(set(targets)))} but the model's QLoRALinear layers are "
            f"{', '.join(model_targets)}; call apply_qlora(model, target_modules={sorted(set(targets))}, ...) first"
        )
    missing, extra = sorted(set(layers) - set(stored)), sorted(set(stored) - set(layers))
    if missing or extra:
        raise ValueError(
            "the adapter's layers do not match the model's QLoRALinear layers: "
            f"{len(missing)} without weights in the adapter ({', '.join(missing[:3]) or '-'}), "
            f"{len(extra)} in the adapter but not in the model ({', '.join(extra[:3]) or '-'})"
        )


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Copy a peft-format adapter into the model's ``QLoRALinear`` layers, in place; returns the model.

    The model must already be a QLoRA model of the same base with the same
    targets, rank and scaling (``apply_qlora(model, target_modules=..., r=...,
    alpha=...)``): everything is checked first, and a mismatch raises
    ValueError naming what was expected, with nothing copied.
    """
    config, stored = read_adapter(directory)
    layers = qlora_layers(model)
    if not layers:
        raise ValueError("expected a model with QLoRALinear layers; call apply_qlora (or load_llama) first")
    _check_targets(config, layers, stored)
    r, alpha, rslora = config.get("r"), config.get("lora_alpha"), bool(config.get("use_rslora", False))
    scaling = lora_scaling(r, alpha if alpha is not None else 8, rslora)  # peft's default lora_alpha is 8
    for name, layer in layers.items():
        if layer.r != r:
            raise ValueError(f"the adapter has rank r={r} but {name} has r={layer.r}; call apply_qlora(model, r={r}, ...)")
        if abs(layer.scaling - scaling) > 1e-12 * abs(scaling):
            raise ValueError(
                f"the adapter's scaling is {scaling:g} (lora_alpha={alpha}, r={r}, use_rslora={rslora}) but {name} "
                f"uses {layer.scaling:g}; call apply_qlora(model, r={r}, alpha={alpha}, use_rslora={rslora}, ...)"
            )
        for part in ("lora_A", "lora_B"):
            expected, got = tuple(getattr(layer, part).shape), tuple(stored[name][part].shape)
            if expected != got:
                raise ValueError(f"{name}.{part}: expected shape {expected} for this model, the adapter has {got}")
    with torch.no_grad():
        for name, layer in layers.items():
            for part in ("lora_A", "lora_B"):
                target = getattr(layer, part)
                target.copy_(stored[name][part].to(device=target.device, dtype=target.dtype))
    return model
