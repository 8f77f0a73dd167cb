"""How the suite reads a model: which tensors are adapters, which layers are quantized, by behaviour and by name.

The training properties (``properties/apply_qlora.py`` and ``properties/training.py``)
see a target's model only through these functions, so what counts as "an adapter"
or "a quantized base layer" is defined once, and defined so that a model as it
comes from another library is a valid target with no wrapper of ours in between:

- **Adapters** are found by their state-dict names, the names peft saves and
  loads: ``<module>.lora_A.<adapter>.weight`` (peft's ``ModuleDict`` of ``nn.Linear``)
  or ``<module>.lora_A`` (a bare parameter, as lora_lab's ``QLoRALinear``).
  ``lora_A`` is (r, K) and ``lora_B`` is (N, r) either way.
- **Module names** are canonical: peft's ``base_model.model.`` prefix is dropped,
  so ``model.layers.0.self_attn.q_proj`` names the same layer in every target.
- **A quantized weight** is one that is not a plain dense floating-point tensor:
  lora_lab's ``NF4Tensor`` (``.packed``), bitsandbytes' ``Params4bit`` (uint8 data
  with a ``quant_state``; ``Linear4bit`` subclasses ``nn.Linear`` but is not dense),
  torchao's ``NF4Tensor`` (a tensor subclass). A wrapper layer (peft's
  ``lora.Linear``) is read through its ``base_layer``.

These are plain functions over an ``nn.Module``: they never import the runner, so
they can run wherever the model lives (the caller's process or a child's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from lora_lab.conformance.compare import UNIT_ROUNDOFF
from lora_lab.model import tiny_llama

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EVERY_LINEAR = (*ATTENTION, "gate_proj", "up_proj", "down_proj")  # every linear layer of a decoder block
DENSE_HEAD = "lm_head"  # the one linear layer real QLoRA (bitsandbytes load_in_4bit) leaves unquantized
PEFT_PREFIX = "base_model.model."  # what peft's PeftModel puts in front of every name of the model it wraps
U32 = UNIT_ROUNDOFF[torch.float32]
# Two decoder layers of fp32 matmuls (K <= 128) and a softmax: a few hundred roundings of 2^-24 each, at most.
MODEL_RTOL = 256 * U32

# "<module>.lora_A", "<module>.lora_A.weight" or "<module>.lora_A.<adapter>.weight" (peft's state-dict names).
_ADAPTER_NAME = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))??(?:\.weight)?$")


@dataclass
class Adapter:
    """One layer's LoRA pair, as the live parameters of the model (copying into them changes the model)."""

    lora_A: torch.Tensor  # (r, K)
    lora_B: torch.Tensor  # (N, r)


def apply_target(target, model, **kwargs):
    """Call the target's apply_qlora; an implementation that works in place and returns None is accepted."""
    result = target.op("apply_qlora")(model, **kwargs)
    return model if result is None else result


def seeded_apply(target, seed: int, **kwargs):
    """tiny_llama(seed) through the target's apply_qlora, with adapters drawn from a fixed RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return apply_target(target, tiny_llama(seed), **kwargs)


def model_logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def canonical_name(name: str) -> str:
    """A module or parameter name without peft's ``base_model.model.`` prefix."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def is_adapter_name(name: str) -> bool:
    return "lora_A" in name or "lora_B" in name


def adapters(model: nn.Module) -> dict[str, Adapter]:
    """Canonical module name -> its (lora_A, lora_B), found by parameter name; peft's "default" adapter first."""
    found: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for name, parameter in model.named_parameters():
        match = _ADAPTER_NAME.match(name)
        if match:
            module, adapter = canonical_name(match["module"]), match["adapter"] or "default"
            found.setdefault(module, {}).setdefault(adapter, {})[match["which"]] = parameter
    pairs = {}
    for module, by_adapter in found.items():
        pair = by_adapter.get("default") or next(iter(by_adapter.values()))
        if "A" in pair and "B" in pair:
            pairs[module] = Adapter(pair["A"], pair["B"])
    return pairs


def module_at(model: nn.Module, name: str) -> nn.Module:
    """The module at a canonical name, in a plain model or one wrapped by peft; AttributeError if there is none."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_submodule(PEFT_PREFIX + name)


def is_quantized(weight) -> bool:
    """True for any weight storage that is not a plain dense floating-point tensor (see the module docstring)."""
    if weight is None:
        return False
    if not isinstance(weight, torch.Tensor):
        return True  # an NF4-like object (lora_lab's NF4Tensor has .packed)
    return type(weight) not in (torch.Tensor, nn.Parameter) or not weight.is_floating_point()


def layer_weight(module: nn.Module):
    """The weight a layer computes with: its own, or its ``base_layer``'s for a wrapper such as peft's lora.Linear."""
    base = getattr(module, "base_layer", None)
    return getattr(base if isinstance(base, nn.Module) else module, "weight", None)


def dense_linear_names(model: nn.Module) -> list[str]:
    """Canonical names of the linear layers that still hold a dense weight, adapters and lm_head excepted.

    After QLoRA this list is empty: every other linear layer is quantized.
    """
    return [
        canonical_name(name) for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not is_adapter_name(name) and name.rsplit(".", 1)[-1] != DENSE_HEAD
        and not is_quantized(m.weight)
    ]


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Canonical names of the layers whose weight is quantized storage (a wrapper and its base_layer count once)."""
    names = [canonical_name(name) for name, m in model.named_modules()
             if not isinstance(getattr(m, "base_layer", None), nn.Module) and is_quantized(getattr(m, "weight", None))]
    return sorted(n[: -len(".base_layer")] if n.endswith(".base_layer") else n for n in names)


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every non-adapter tensor: the state dict (bitsandbytes keeps its quant state there), every buffer,
    persistent or not, plus the tensor fields of NF4-like weights that live outside it (lora_lab's NF4Tensor)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if isinstance(v, torch.Tensor) and not is_adapter_name(k)}
    for name, buffer in model.named_buffers():  # non-persistent buffers too (rotary inv_freq): not in the state dict
        if not is_adapter_name(name):
            state.setdefault(name, buffer.detach().clone())
    for name, m in model.named_modules():
        weight = getattr(m, "weight", None)
        if weight is not None and not isinstance(weight, torch.Tensor):
            for field, value in getattr(weight, "__dict__", {}).items():
                if isinstance(value, torch.Tensor):
                    state[f"{name}.weight.{field}"] = value.detach().clone()
    return state


def _reachable_storages(obj, storages: dict[int, int], seen: set[int], skip_adapters: bool) -> None:
    """Add the storages of every tensor reachable from ``obj``'s attributes (modules, containers, plain objects)."""
    import types

    if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType, types.MethodType, str, bytes)):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "meta" and obj.untyped_storage().nbytes():
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        children = list(getattr(obj, "__dict__", {}).values())  # bitsandbytes' Params4bit keeps its quant_state here
    elif isinstance(obj, nn.Module):
        children = [v for k, v in vars(obj).items() if k not in ("_parameters", "_buffers", "_modules")]
        for group in ("_parameters", "_buffers", "_modules"):
            children += [v for k, v in getattr(obj, group).items() if not (skip_adapters and is_adapter_name(k))]
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    else:
        children = list(getattr(obj, "__dict__", {}).values())
    for child in children:
        _reachable_storages(child, storages, seen, skip_adapters)


def quantized_layer_bytes(model: nn.Module) -> dict[str, int]:
    """Canonical name of each quantized layer -> bytes of the tensor storage it holds, adapters left out.

    A census, not a trust in names: every tensor reachable from the layer's attributes
    counts (parameters, buffers, plain attributes, the fields of an NF4 object or of
    a quant state), each storage once. A hidden dense copy of the weight shows here.
    """
    census = {}
    for name in quantized_layer_names(model):
        storages: dict[int, int] = {}
        _reachable_storages(module_at(model, name), storages, set(), skip_adapters=True)
        census[name] = sum(storages.values())
    return census
