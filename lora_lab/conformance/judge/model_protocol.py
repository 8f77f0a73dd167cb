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
they can run wherever the model lives (the caller's process or a child's). The
properties themselves never hold a target's model: they hold a ``ModelHandle``,
whose few methods call these functions where the model lives. A handle works the
same in this process (lora_lab's own reference, the fast path of the tests) and
behind a process boundary (``isolation.RemoteModel`` forwards each method to the
``ModelHandle`` in the target's process), so the properties are written once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from lora_lab.conformance.judge.autograd import backward
from lora_lab.conformance.judge.compare import UNIT_ROUNDOFF
from lora_lab.conformance.judge.memory import reachable_storages
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
    state: dict[str, torch.Tensor] = {}

    def keep(name: str, tensor: torch.Tensor) -> None:
        if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
            for inner in tensor.__tensor_flatten__()[0]:  # torchao's NF4Tensor: the tensors it is made of
                keep(f"{name}.{inner}", getattr(tensor, inner))
        elif isinstance(tensor, torch.Tensor):
            state.setdefault(name, tensor.detach().clone())

    for k, v in model.state_dict().items():
        if not is_adapter_name(k):
            keep(k, v)
    for name, buffer in model.named_buffers():  # non-persistent buffers too (rotary inv_freq): not in the state dict
        if not is_adapter_name(name):
            keep(name, buffer)
    for name, m in model.named_modules():
        weight = getattr(m, "weight", None)
        if weight is not None and not isinstance(weight, torch.Tensor):
            for field, value in getattr(weight, "__dict__", {}).items():
                if isinstance(value, torch.Tensor):
                    state[f"{name}.weight.{field}"] = value.detach().clone()
    return state


def quantized_layer_bytes(model: nn.Module) -> dict[str, int]:
    """Canonical name of each quantized layer -> bytes of the tensor storage it holds, adapters left out.

    A census, not a trust in names: every tensor reachable from the layer's attributes
    counts (parameters, buffers, plain attributes, the fields of an NF4 object or of
    a quant state), each storage once. A hidden dense copy of the weight shows here.
    """
    census = {}
    for name in quantized_layer_names(model):
        storages: dict[int, int] = {}
        reachable_storages(module_at(model, name), storages, skip=is_adapter_name)
        census[name] = sum(storages.values())
    return census


def held_bytes(model: nn.Module) -> int:
    """Bytes of every tensor storage reachable from the model, adapters left out, each storage once: the whole census
    (a dense copy hidden anywhere in the model, not only in a layer, shows here)."""
    storages: dict[int, int] = {}
    reachable_storages(model, storages, skip=is_adapter_name)
    return sum(storages.values())


class ModelHandle:
    """A target's QLoRA model and what the properties may ask of it; every answer is a copy.

    Built by the target's own ``apply_qlora`` on ``tiny_llama(seed)``; the optimizer
    is built here from the property's spec, so the target's ``training_step`` gets
    a real ``torch.optim.AdamW`` it did not choose.
    """

    # The methods a remote handle forwards; nothing else of the model is reachable from the parent.
    METHODS = ("adapters", "set_adapters", "parameters", "frozen_state", "dense_linear_names", "quantized_layer_names",
               "layer_kinds", "train", "logits", "backward_loss", "adapter_gradients", "enable_checkpointing",
               "make_optimizer", "training_step", "recorded_step", "kept_for_backward", "layer_forward",
               "quantized_layer_bytes", "held_bytes", "modes", "stray_weights")

    def __init__(self, target, model: nn.Module) -> None:
        self.target, self.model, self.optimizer, self.seed = target, model, None, None
        self.census: tuple[dict, set[int]] | None = None  # what was alive before the build, the linear weights' sizes

    @classmethod
    def build(cls, target, seed: int, checkpointing: str | None = None, dtype: str | None = None, census: bool = False,
              **kwargs) -> ModelHandle:
        """``tiny_llama(seed)`` (in ``dtype``, e.g. "bfloat16") through the target's apply_qlora; ``checkpointing``
        ("reentrant" or "non-reentrant") turns on Hugging Face gradient checkpointing before apply_qlora sees the model;
        ``census`` notes every tensor alive before, for ``stray_weights`` (a full garbage collection: only on request)."""
        from lora_lab.conformance.judge.memory import storages_alive

        before = storages_alive(collect=False) if census else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dense = tiny_llama(seed) if dtype is None else tiny_llama(seed).to(getattr(torch, dtype))
            sizes = {m.weight.numel() for m in dense.modules() if isinstance(m, nn.Linear)}
            if checkpointing is not None:
                enable_checkpointing(dense, checkpointing == "reentrant")
            handle = cls(target, apply_target(target, dense, **kwargs))
        handle.seed = seed
        handle.census = None if before is None else (before, sizes)
        return handle

    def adapters(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{canonical module name: {"lora_A": A, "lora_B": B}}``, copies."""
        return {name: {"lora_A": a.lora_A.detach().clone(), "lora_B": a.lora_B.detach().clone()}
                for name, a in adapters(self.model).items()}

    def set_adapters(self, values: dict[str, dict[str, torch.Tensor]]) -> None:
        live = adapters(self.model)
        with torch.no_grad():
            for name, pair in values.items():
                for which, value in pair.items():
                    getattr(live[name], which).copy_(value)

    def parameters(self) -> dict[str, dict]:
        """``{name: {"requires_grad": bool, "grad": tensor or None}}`` for every parameter."""
        return {name: {"requires_grad": p.requires_grad, "grad": None if p.grad is None else p.grad.detach().clone()}
                for name, p in self.model.named_parameters()}

    def frozen_state(self) -> dict[str, torch.Tensor]:
        return frozen_state(self.model)

    def dense_linear_names(self) -> list[str]:
        return dense_linear_names(self.model)

    def quantized_layer_names(self) -> list[str]:
        return quantized_layer_names(self.model)

    def quantized_layer_bytes(self) -> dict[str, int]:
        """The census of ``quantized_layer_bytes``: bytes of tensor storage each quantized layer holds."""
        return quantized_layer_bytes(self.model)

    def held_bytes(self) -> int:
        return held_bytes(self.model)

    def stray_weights(self) -> list[list]:
        """Tensors with a linear layer's weight size alive in this process, made since the build, that the model does
        not reach (``memory.stray_weights``): a dense copy kept in a module-level dict or a cache. Needs ``census``."""
        from lora_lab.conformance.judge.memory import seen_to_wire, stray_weights

        if self.census is None:
            raise RuntimeError("stray_weights needs the model built with census=True")
        before, sizes = self.census
        reachable: dict[int, int] = {}
        reachable_storages(self, reachable)  # the model, and the handle's optimizer state
        return seen_to_wire(stray_weights(before, set(reachable), sizes))

    def layer_kinds(self, names: list[str]) -> dict[str, dict]:
        """For each canonical name: the layer's class, whether it is an ``nn.Linear``, and its weight's type and storage."""
        kinds = {}
        for name in names:
            module = module_at(self.model, name)
            weight = layer_weight(module)
            kinds[name] = {"class": type(module).__name__, "linear": isinstance(module, nn.Linear),
                           "weight_type": type(weight).__name__, "quantized": is_quantized(weight)}
        return kinds

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def modes(self) -> dict[str, bool]:
        """``{submodule name: training}`` for the model and every submodule ("" is the model itself)."""
        return {name: m.training for name, m in self.model.named_modules()}

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return model_logits(self.model, batch).detach().clone()

    def backward_loss(self, batch: dict[str, torch.Tensor]) -> None:
        """lora_lab's next-token loss on ``batch`` and its backward pass: gradients land where the model lets them."""
        from lora_lab.loss import next_token_loss

        next_token_loss(model_logits(self.model, batch), batch["labels"]).backward()

    def adapter_gradients(self, batch: dict[str, torch.Tensor], grad_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The vector-Jacobian product of the model's logits with ``grad_logits``, for each adapter tensor.

        The caller computes its loss, and ``grad_logits``, from ``logits(batch)`` on its own side, so the loss that
        defines the expected gradients never runs where the target does.
        """
        logits = model_logits(self.model, batch)
        parameters = adapter_parameters(self.model)
        # the gradient of sum(logits * grad_logits): bit for bit the vector-Jacobian product (autograd.backward)
        grads = torch.autograd.grad((logits * grad_logits.to(logits.dtype)).sum(), list(parameters.values()))
        return {name: g.detach().clone() for name, g in zip(parameters, grads)}

    def enable_checkpointing(self, reentrant: bool) -> None:
        enable_checkpointing(self.model, reentrant)

    def recorded_step(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor | None]]:
        """The target's ``training_step`` with a ``GradientRecorder`` for an optimizer: the gradients of each ``step()``."""
        recorder = GradientRecorder(adapter_parameters(self.model))
        self.target.op("training_step")(self.model, batch, recorder)
        return recorder.recorded

    def layer_forward(self, name: str, x: torch.Tensor, grad_out: torch.Tensor
                      ) -> tuple[torch.Tensor, list[torch.dtype], torch.Tensor | None]:
        """One layer's output for ``x`` (with grad, as in training), the dtypes of the tensors of x's size it made, and
        the gradient of x for ``grad_out`` (None when none reaches x)."""
        from lora_lab.conformance.judge.memory import measure

        x = x.detach().clone().requires_grad_()
        with measure(lambda n: n == x.numel()) as record:
            y = module_at(self.model, name)(x)
        created = sorted({s.dtype for s in record.created}, key=str)
        if isinstance(y, torch.Tensor) and y.requires_grad and y.shape == grad_out.shape:
            backward([y], [grad_out])
        return (y.detach().clone() if isinstance(y, torch.Tensor) else y), created, x.grad

    def kept_for_backward(self, batch: dict[str, torch.Tensor]) -> dict:
        """What one forward pass on ``batch`` keeps for backward (``memory.model_kept_for_backward``), measured here."""
        from lora_lab.conformance.judge.memory import model_kept_for_backward

        return model_kept_for_backward(self.model, tiny_llama(self.seed), batch, lambda: model_logits(self.model, batch),
                                       quantized_layer_names(self.model), module_at)

    def make_optimizer(self, lr: float, weight_decay: float = 0.01, every_parameter: bool = False) -> None:
        """torch's AdamW over the trainable parameters (or, with ``every_parameter``, over all of them)."""
        params = [p for p in self.model.parameters() if every_parameter or p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)

    def training_step(self, batch: dict[str, torch.Tensor]):
        """The target's ``training_step(model, batch, optimizer)``; its return value as it came."""
        if self.optimizer is None:
            raise RuntimeError("make_optimizer must come before training_step")
        return self.target.op("training_step")(self.model, batch, self.optimizer)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{"<module>.lora_A": A, "<module>.lora_B": B}`` for every adapted module: the live parameters."""
    return {f"{name}.{which}": getattr(pair, which) for name, pair in adapters(model).items() for which in ("lora_A", "lora_B")}


def enable_checkpointing(model: nn.Module, reentrant: bool) -> None:
    """Hugging Face gradient checkpointing, as ``Trainer(gradient_checkpointing=True)`` turns it on."""
    import warnings

    with warnings.catch_warnings():  # transformers 5 renamed it activation_checkpointing_enable; both work
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


class GradientRecorder(torch.optim.Optimizer):
    """An optimizer that changes nothing and keeps a copy of the gradients each ``step()`` receives.

    Handed to a target's ``training_step``, it shows the gradients the step
    computed, however the step computed them.
    """

    def __init__(self, named_parameters: dict[str, nn.Parameter]) -> None:
        super().__init__(list(named_parameters.values()), {})
        self.names = {id(p): name for name, p in named_parameters.items()}
        self.recorded: list[dict[str, torch.Tensor | None]] = []

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - the optimizer protocol
        grads = {self.names[id(p)]: None if p.grad is None else p.grad.detach().clone()
                 for group in self.param_groups for p in group["params"]}
        self.recorded.append(grads)
