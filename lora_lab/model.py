"""The model: a Llama, made QLoRA by freezing it in NF4 and attaching adapters.

    model = tiny_llama(seed=0)          # a 2-layer Llama that runs in milliseconds on a CPU
    apply_qlora(model, r=8, alpha=16)   # every linear but lm_head -> NF4; LoRA on q/k/v/o; everything else frozen
    print(trainable_summary(model))

``tiny_llama`` is a real ``transformers`` ``LlamaForCausalLM`` (rotary
embeddings, grouped-query attention, SwiGLU, RMSNorm), only small: the lecture's
steps run on it exactly as they would on Llama 3.1 8B. The presets describe the
real models' shapes so that ``lora-lab size`` can do their arithmetic without
any weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lora_lab.data import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
from lora_lab.lora import NF4Linear, QLoRALinear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
KEPT_DENSE = ("lm_head",)  # the one linear layer QLoRA leaves unquantized (as bitsandbytes' load_in_4bit does)


@dataclass(frozen=True)
class ModelPreset:
    """The shape of a Llama model: all that sizes and ``tiny_llama`` need."""

    hidden: int  # width of the residual stream (hidden_size)
    intermediate: int  # width of the SwiGLU MLP (intermediate_size)
    layers: int  # decoder blocks
    heads: int  # query heads; head_dim = hidden / heads
    kv_heads: int  # key/value heads (grouped-query attention shares each among heads / kv_heads queries)
    vocab: int  # token embeddings and output logits
    max_positions: int = 131072  # longest sequence the rotary embedding is set up for
    tie_embeddings: bool = False  # output head shares the input embedding matrix (Llama 3.2 1B does)
    rope_theta: float = 500000.0  # rotary base frequency (Llama 3 uses 500k)

    @classmethod
    def from_name(cls, name: str) -> ModelPreset:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        return PRESETS[name]

    def to_config(self, **overrides):
        """A ``LlamaConfig`` with this shape; ``overrides`` are LlamaConfig keyword arguments."""
        from transformers import LlamaConfig

        settings = dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.max_positions,
            tie_word_embeddings=self.tie_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            rms_norm_eps=1e-5,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        )
        settings.update(overrides)
        return LlamaConfig(**settings)


PRESETS = {
    "llama-3.1-8b": ModelPreset(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
    "llama-3.2-1b": ModelPreset(
        hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, tie_embeddings=True
    ),
    # Widths are multiples of 64 so every weight splits into whole NF4 blocks; the vocabulary is lora_lab.data's.
    "tiny": ModelPreset(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=VOCAB_SIZE, max_positions=128),
}


def tiny_llama(seed: int = 0, **config_overrides):
    """A freshly initialised ``LlamaForCausalLM`` of the "tiny" preset; the same seed gives the same weights.

    The global torch RNG is left as it was, so building a model never changes
    what later random draws (adapter initialisation, data) produce.
    """
    from transformers import LlamaForCausalLM

    config = PRESETS["tiny"].to_config(**config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's ``nn.Linear`` modules ("q_proj", "lm_head", ...)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)})


def apply_qlora(
    model: nn.Module,
    target_modules: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    use_rslora: bool = False,
    blocksize: int = 64,
    double_quant: bool = True,
    backend: str = "reference",
    quantize_base: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Make ``model`` a QLoRA model, in place, and return it.

    Every ``nn.Linear`` whose last name is in ``target_modules`` becomes a
    ``QLoRALinear`` (NF4 weight, fresh adapters with B = 0, so the model's
    output does not change beyond NF4 rounding), and every other parameter is
    frozen: only the adapters will receive gradients. With ``quantize_base``
    (the default, as in real QLoRA) every other ``nn.Linear`` except
    ``lm_head`` becomes an ``NF4Linear`` with the same quantization: the whole
    base is frozen in NF4, and adapters go only on the targets.

    ``compute_dtype`` (bitsandbytes' ``bnb_4bit_compute_dtype``) is the dtype
    both paths of every quantized layer compute in: fp32, bf16 or fp16; unset,
    the dtype of the activations (fp32 for ``tiny_llama``). The adapters stay
    fp32 (AdamW's updates are too small for bf16) and are cast for the matmul.
    """
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = set(target_modules)
    available = linear_names(model)
    missing = sorted(targets - set(available))
    if missing:
        raise ValueError(
            f"target module(s) {', '.join(missing)} match no nn.Linear in the model; its linear layers are named "
            f"{', '.join(available)}"
        )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = QLoRALinear.from_linear(
            linear, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
            blocksize=blocksize, double_quant=double_quant, backend=backend, compute_dtype=compute_dtype,
        )
        setattr(parent, child, layer)
    if quantize_base:
        rest = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in KEPT_DENSE
        ]
        for name, linear in rest:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, NF4Linear.from_linear(linear, blocksize, double_quant, compute_dtype))
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # the name since transformers 5
    if checkpointing if checkpointing is not None else getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()  # see enable_gradient_checkpointing: older transformers leave it out
    return model


def enable_gradient_checkpointing(model: nn.Module, reentrant: bool = False) -> nn.Module:
    """Recompute each decoder block's activations in backward instead of keeping them; returns ``model``.

    The activations of a training step grow with layers x batch x sequence x
    hidden; checkpointing keeps only each block's input and recomputes the rest
    during backward (about one more forward pass of compute). With a frozen,
    quantized base, *reentrant* checkpointing has a trap: it recomputes a block
    only for inputs that require grad, and the embeddings' output does not, so
    the adapters silently get no gradient (transformers#26221, peft#1142).
    Making the input embeddings' output require grad closes it; transformers 5
    does so itself, older versions do not. Non-reentrant (the default here,
    and PyTorch's recommendation) does not need it.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)  # the name since transformers 5
    kwargs = {"use_reentrant": reentrant}
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    return model


@dataclass(frozen=True)
class TrainableSummary:
    trainable: int  # parameters that receive gradients (the adapters)
    total: int  # every weight of the model, NF4 ones included
    adapter_bytes: int  # storage of the trainable parameters

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    @property
    def adapter_mb(self) -> float:
        return self.adapter_bytes / 1e6

    def __str__(self) -> str:
        return (
            f"trainable parameters: {self.trainable:,} of {self.total:,} ({100 * self.share:.2f}%), "
            f"adapters {self.adapter_mb:.3f} MB"
        )


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """How much of the model QLoRA trains: the point of LoRA is that this share is small."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen_nf4 = sum(m.weight.numel for m in model.modules() if isinstance(m, NF4Linear))  # QLoRALinear's too
    total = sum(p.numel() for p in model.parameters()) + frozen_nf4
    return TrainableSummary(trainable, total, adapter_bytes)
