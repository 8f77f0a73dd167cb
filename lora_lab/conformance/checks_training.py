"""Properties of apply_qlora and training_step (exercise 06).

Oracles:

- apply_qlora: the dense model with every linear weight but lm_head's replaced
  by its dequantized NF4 (QLoRA quantizes the whole base, not only the targets);
- training_step: lora_lab's reference on an identical model, and the canonical
  stack, peft's LoRA on the targets of a model whose every linear layer but
  lm_head is a bitsandbytes ``Linear4bit`` (as ``load_in_4bit`` makes it),
  trained with transformers' loss and torch's AdamW. bitsandbytes is
  kept in train mode: in eval mode its CPU path repacks the weight and computes
  approximately in bf16.

Every model here is ``tiny_llama`` (2 layers, hidden 64): a check takes seconds.
"""

from __future__ import annotations

import math

import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from lora_lab.conformance.compare import UNIT_ROUNDOFF, assert_close, assert_equal, seeded_generator
from lora_lab.conformance.core import CheckFailed, check
from lora_lab.conformance.profiles import examples
from lora_lab.data import VOCAB_SIZE, collate, generate_products
from lora_lab.model import tiny_llama

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EVERY_LINEAR = (*ATTENTION, "gate_proj", "up_proj", "down_proj")  # every linear layer of a decoder block
DENSE_HEAD = "lm_head"  # the one linear layer real QLoRA (bitsandbytes load_in_4bit) leaves unquantized
U32 = UNIT_ROUNDOFF[torch.float32]
# Model-level draws are only seeds and hyperparameters: shrinking them teaches nothing and retrains models for minutes.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)
# Two decoder layers of fp32 matmuls (K <= 128) and a softmax: a few hundred roundings of 2^-24 each, at most.
MODEL_RTOL = 256 * U32


# ---------------------------------------------------------------------------- apply_qlora (exercise 06)


def _apply(target, model, **kwargs):
    """Call the target's apply_qlora; an implementation that works in place and returns None is accepted."""
    result = target.op("apply_qlora")(model, **kwargs)
    return model if result is None else result


def _adapted(model) -> dict:
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "lora_B")}


def _is_adapter(name: str) -> bool:
    return "lora_A" in name or "lora_B" in name


def _seeded_apply(target, seed: int, **kwargs):
    """tiny_llama(seed) through the target's apply_qlora, with adapters drawn from a fixed RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _apply(target, tiny_llama(seed), **kwargs)


def _logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _base_linears(model) -> list[str]:
    """Module paths of the model's linear layers that QLoRA quantizes: all of them but lm_head."""
    from torch import nn

    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] != DENSE_HEAD]


@check(
    "qlora.apply_trains_only_adapters",
    requires=("apply_qlora",),
    points=8,
    exercise="06",
    hint="After apply_qlora, which tensors may an optimizer change? Everything the model had before (embeddings, "
    "norms, lm_head, the linear layers you did not target) must stop requiring gradients; only the new adapters train.",
)
def apply_trains_only_adapters(target) -> None:
    """Exactly the targeted layers get adapters, and after backward only lora_A/lora_B require or hold a gradient."""
    from lora_lab.loss import next_token_loss

    @settings(max_examples=examples(4), phases=NO_SHRINK)
    @given(st.integers(0, 1000), st.sets(st.sampled_from(EVERY_LINEAR), min_size=1), st.sampled_from((1, 4, 8)))
    def prop(seed, targets, r):
        model = _seeded_apply(target, seed, target_modules=tuple(sorted(targets)), r=r, alpha=2 * r)
        adapted = _adapted(model)
        layers = model.config.num_hidden_layers
        expected = sorted(f"model.layers.{i}.{'self_attn' if t in ATTENTION else 'mlp'}.{t}"
                          for i in range(layers) for t in targets)
        if sorted(adapted) != expected:
            raise CheckFailed(f"expected adapters on {expected}, got them on {sorted(adapted)}")
        dense = tiny_llama(seed)
        for name, m in adapted.items():
            shape_a, shape_b = (r, dense.get_submodule(name).in_features), (dense.get_submodule(name).out_features, r)
            if tuple(m.lora_A.shape) != shape_a or tuple(m.lora_B.shape) != shape_b:
                raise CheckFailed(f"{name}: expected lora_A {shape_a} and lora_B {shape_b}, "
                                  f"got {tuple(m.lora_A.shape)} and {tuple(m.lora_B.shape)}")
        batch = collate(generate_products(2, seed=seed))
        next_token_loss(_logits(model, batch), batch["labels"]).backward()
        for name, p in model.named_parameters():
            if _is_adapter(name):
                if not p.requires_grad or p.grad is None:
                    raise CheckFailed(f"adapter {name} should be trainable and receive a gradient; it did not")
            elif p.requires_grad or p.grad is not None:
                raise CheckFailed(f"{name} is not an adapter but requires_grad={p.requires_grad}, "
                                  f"has a gradient={p.grad is not None}; expected it frozen")

    prop()


@check(
    "qlora.apply_quantizes_whole_base",
    requires=("apply_qlora",),
    points=4,
    exercise="06",
    hint="QLoRA freezes AND quantizes the whole base; adapters go only on the targets. Every linear layer you do not "
    "target (the MLP's, by default) must be stored in NF4 too, frozen and without adapters; only lm_head stays dense.",
)
def apply_quantizes_whole_base(target) -> None:
    """After apply_qlora no linear layer but lm_head keeps a dense weight: targets or not, each holds an NF4 weight."""

    @settings(max_examples=examples(3), phases=NO_SHRINK)
    @given(st.integers(0, 1000), st.sets(st.sampled_from(EVERY_LINEAR), min_size=1))
    def prop(seed, targets):
        from torch import nn

        model = _seeded_apply(target, seed, target_modules=tuple(sorted(targets)))
        dense = _base_linears(model)
        if dense:
            raise CheckFailed(f"{len(dense)} linear layer(s) kept a dense weight after apply_qlora "
                              f"(target_modules={sorted(targets)}), e.g. {', '.join(dense[:3])}; expected every "
                              f"linear layer but {DENSE_HEAD} in NF4")
        for name in _base_linears(tiny_llama(seed)):
            weight = getattr(model.get_submodule(name), "weight", None)
            if not hasattr(weight, "packed"):
                raise CheckFailed(f"{name} should hold an NF4 weight (one with .packed) after apply_qlora; "
                                  f"its weight is a {type(weight).__name__}")
        if not isinstance(model.get_submodule(DENSE_HEAD), nn.Linear):
            raise CheckFailed(f"{DENSE_HEAD} should stay a dense nn.Linear (QLoRA leaves the output head unquantized), "
                              f"got {type(model.get_submodule(DENSE_HEAD)).__name__}")

    prop()


@check(
    "qlora.apply_fresh_adapters_keep_base",
    requires=("apply_qlora",),
    points=6,
    exercise="06",
    hint="Before any training a QLoRA model must compute exactly what its quantized base computes. How must the "
    "adapters start for their contribution to be exactly zero? And honour the quantization options you are given.",
)
def apply_fresh_adapters_keep_base(target) -> None:
    """With fresh adapters (B = 0) the logits equal, bit for bit, the dense model holding its dequantized NF4 weights."""
    from lora_lab.nf4 import dequantize_nf4, quantize_nf4

    @settings(max_examples=examples(3), phases=NO_SHRINK)
    @given(st.integers(0, 1000), st.sampled_from(((64, True), (64, False), (32, True))), st.booleans())
    def prop(seed, quantization, attention_only):
        blocksize, double_quant = quantization
        targets = ATTENTION if attention_only else EVERY_LINEAR
        model = _seeded_apply(target, seed, target_modules=targets, blocksize=blocksize, double_quant=double_quant).train()
        dense = tiny_llama(seed)
        with torch.no_grad():
            for name in _base_linears(dense):  # targets or not: QLoRA quantizes every linear layer but lm_head
                m = dense.get_submodule(name)
                m.weight.copy_(dequantize_nf4(quantize_nf4(m.weight, blocksize, double_quant)))
            batch = collate(generate_products(3, seed=seed))
            where = f"blocksize={blocksize}, double_quant={double_quant}"
            assert_equal(_logits(model, batch), _logits(dense, batch), f"logits, fresh adapters vs dequantized base ({where})")

    prop()


@check(
    "qlora.apply_dropout_only_in_training",
    requires=("apply_qlora",),
    points=4,
    exercise="06",
    hint="Dropout is a training-time regulariser: your layer must follow the module's train()/eval() mode. "
    "Functional dropout does not know that mode unless it is told.",
)
def apply_dropout_only_in_training(target) -> None:
    """With dropout > 0: eval() is deterministic and equals the no-dropout model; train() really drops."""
    from lora_lab.model import apply_qlora as reference_apply

    @settings(max_examples=examples(2), phases=NO_SHRINK)
    @given(st.integers(0, 1000))
    def prop(seed):
        model = _seeded_apply(target, seed, dropout=0.5)
        reference = reference_apply(tiny_llama(seed))
        g = seeded_generator(seed)
        with torch.no_grad():
            for name, m in _adapted(model).items():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.5)
                ref = reference.get_submodule(name)
                ref.lora_A.copy_(m.lora_A)
                ref.lora_B.copy_(m.lora_B)
            batch = collate(generate_products(2, seed=seed))
            model.eval()
            first, second = _logits(model, batch), _logits(model, batch)
            assert_equal(second, first, "two eval-mode forward passes with dropout=0.5")
            expected = _logits(reference.eval(), batch)
            assert_close(first, expected, MODEL_RTOL * (1 + expected.abs()), "eval-mode logits vs the same model without dropout")
            model.train()
            if torch.equal(_logits(model, batch), _logits(model, batch)):
                raise CheckFailed("two train-mode forward passes with dropout=0.5 gave identical logits: dropout is not applied")

    prop()


@check(
    "qlora.apply_rejects_unknown_target",
    requires=("apply_qlora",),
    points=2,
    exercise="06",
    hint="A misspelt target module must not silently train nothing: raise ValueError saying what was not "
    "found and which linear layers exist.",
)
def apply_rejects_unknown_target(target) -> None:
    """A target name that matches no linear layer raises ValueError that names it."""
    try:
        _apply(target, tiny_llama(0), target_modules=("q_proj", "qkv_proj"))
    except ValueError as exc:
        if "qkv_proj" not in str(exc):
            raise CheckFailed(f"the ValueError should name the unknown target 'qkv_proj'; it says: {exc}") from exc
        return
    raise CheckFailed("apply_qlora(model, target_modules=('q_proj', 'qkv_proj')) returned; expected a ValueError")


# ---------------------------------------------------------------------------- training_step (exercise 06)

TRAINING_HINT = (
    "A training step is the lecture's four steps, in order. Think about what each leaves behind for the next call: "
    "gradients accumulate in .grad until they are cleared, and the loss worth reporting is the one the gradients came from."
)
LOWERS_LOSS_STEPS, LOWERS_LOSS_MARGIN = 10, 0.10  # lora_lab's reference lowers it by about 16-18% (lr 1e-2, r 8)


def _optimizer(model, lr: float, weight_decay: float = 0.01) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay, foreach=False)


def _twins(target, seed: int, r: int, alpha: float):
    """The target's QLoRA tiny_llama and lora_lab's, holding the same adapter values (the target's)."""
    from lora_lab.model import apply_qlora as reference_apply

    model = _seeded_apply(target, seed, r=r, alpha=alpha).train()
    reference = reference_apply(tiny_llama(seed), r=r, alpha=alpha).train()
    adapted, reference_adapted = _adapted(model), _adapted(reference)
    if sorted(adapted) != sorted(reference_adapted):
        raise CheckFailed(f"expected adapters on {sorted(reference_adapted)}, got them on {sorted(adapted)}")
    with torch.no_grad():
        for name, m in reference_adapted.items():
            m.lora_A.copy_(adapted[name].lora_A)
            m.lora_B.copy_(adapted[name].lora_B)
    return model, reference


def _price_loss(model, batch) -> float:
    from lora_lab.loss import next_token_loss

    with torch.no_grad():
        return next_token_loss(_logits(model, batch), batch["labels"]).item()


def _as_loss(value, step: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckFailed(f"training_step must return the loss as a Python float (loss.item()), got {type(value).__name__} "
                          f"at step {step}; a tensor would keep the whole autograd graph alive")
    return float(value)


def _assert_loss(got: float, expected: float, what: str) -> None:
    allowed = 16 * U32 * (1 + abs(expected)) * math.sqrt(VOCAB_SIZE)
    assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), allowed, what)


@check(
    "training.matches_reference",
    requires=("apply_qlora", "training_step"),
    points=10,
    exercise="06",
    hint=TRAINING_HINT + " If the trajectory drifts from the second step on, look at what happens to .grad between calls.",
)
def matches_reference(target) -> None:
    """Four training steps give the same losses and adapters as lora_lab's training_step on an identical model."""
    from lora_lab.train import training_step as reference_step

    @settings(max_examples=examples(3), phases=NO_SHRINK)
    @given(st.integers(0, 1000), st.sampled_from((4, 8)), st.sampled_from((8, 32)), st.sampled_from((1e-3, 1e-2)),
           st.integers(1, 4))
    def prop(seed, r, alpha, lr, batch_size):
        model, reference = _twins(target, seed, r, alpha)
        optimizer, reference_optimizer = _optimizer(model, lr), _optimizer(reference, lr)
        steps = 4
        for step in range(1, steps + 1):
            batch = collate(generate_products(batch_size, seed=1000 * seed + step))
            got = _as_loss(target.op("training_step")(model, batch, optimizer), step)
            expected = reference_step(reference, batch, reference_optimizer)
            _assert_loss(got, expected, f"loss returned by step {step} (r={r}, alpha={alpha}, lr={lr})")
        for name, m in _adapted(reference).items():
            for which in ("lora_A", "lora_B"):
                expected = getattr(m, which).detach()
                assert_close(getattr(model.get_submodule(name), which).detach(), expected,
                             MODEL_RTOL * (expected.abs() + lr * steps), f"{name}.{which} after {steps} steps (lr={lr})")

    prop()


@check(
    "training.returns_loss_before_update",
    requires=("apply_qlora", "training_step"),
    points=4,
    exercise="06",
    hint=TRAINING_HINT + " Which forward pass's loss should the caller see, and as what type?",
)
def returns_loss_before_update(target) -> None:
    """training_step returns, as a float, the loss of the model as it was before this step, and it does update."""

    @settings(max_examples=examples(2), phases=NO_SHRINK)
    @given(st.integers(0, 1000))
    def prop(seed):
        model = _seeded_apply(target, seed).train()
        optimizer = _optimizer(model, 1e-2)
        batch = collate(generate_products(2, seed=seed))
        for step in (1, 2):
            before = _price_loss(model, batch)
            adapters = {n: p.detach().clone() for n, p in model.named_parameters() if _is_adapter(n)}
            got = _as_loss(target.op("training_step")(model, batch, optimizer), step)
            _assert_loss(got, before, f"loss returned by step {step} vs the loss before that step's update")
            if all(torch.equal(p.detach(), adapters[n]) for n, p in model.named_parameters() if _is_adapter(n)):
                raise CheckFailed(f"step {step} left every adapter unchanged: the optimizer did not update them")

    prop()


def _frozen_state(model) -> dict[str, torch.Tensor]:
    """Every non-adapter tensor of the model, NF4 storage included (it is not in the state_dict)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not _is_adapter(k)}
    for name, m in model.named_modules():
        weight = getattr(m, "weight", None)
        if hasattr(weight, "packed"):
            for field in ("packed", "absmax", "absmax_scale", "absmax_code"):
                if isinstance(getattr(weight, field, None), torch.Tensor):
                    state[f"{name}.weight.{field}"] = getattr(weight, field).detach().clone()
    return state


@check(
    "training.base_untouched",
    requires=("apply_qlora", "training_step"),
    points=6,
    exercise="06",
    hint="QLoRA never changes the base model: no frozen parameter may receive a gradient, even when the optimizer "
    "was given all of model.parameters(), and the NF4 bytes are read-only.",
)
def base_untouched(target) -> None:
    """After training steps, with an optimizer over all parameters, NF4 bytes and every non-adapter tensor are bit-identical."""

    @settings(max_examples=examples(2), phases=NO_SHRINK)
    @given(st.integers(0, 1000))
    def prop(seed):
        model = _seeded_apply(target, seed).train()
        before = _frozen_state(model)
        if not any(k.endswith(".packed") for k in before):
            raise CheckFailed("found no NF4 weight (a module whose .weight has .packed) after apply_qlora")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
        batch = collate(generate_products(2, seed=seed))
        for _ in range(3):
            target.op("training_step")(model, batch, optimizer)
        after = _frozen_state(model)
        for name, tensor in before.items():
            if name not in after:
                raise CheckFailed(f"{name} disappeared during training")
            assert_equal(after[name], tensor, f"{name} after 3 training steps")

    prop()


@check(
    "training.lowers_loss",
    requires=("apply_qlora", "training_step"),
    points=4,
    exercise="06",
    hint=TRAINING_HINT + " If the loss does not fall, check the order of the update and the clearing of "
    "gradients, and which way the update goes.",
)
def lowers_loss(target) -> None:
    """Training on the same 2 prompts lowers their loss by at least 10% within 10 steps (lr 1e-2, r 8)."""

    @settings(max_examples=examples(2), phases=NO_SHRINK)
    @given(st.integers(0, 1000))
    def prop(seed):
        model = _seeded_apply(target, seed, r=8, alpha=16).train()
        optimizer = _optimizer(model, 1e-2)
        batch = collate(generate_products(2, seed=seed))
        before = _price_loss(model, batch)
        for _ in range(LOWERS_LOSS_STEPS):
            target.op("training_step")(model, batch, optimizer)
        after = _price_loss(model, batch)
        if after > (1 - LOWERS_LOSS_MARGIN) * before:
            raise CheckFailed(f"expected the loss on the same 2 prompts to fall by at least {LOWERS_LOSS_MARGIN:.0%} in "
                              f"{LOWERS_LOSS_STEPS} steps (AdamW lr=1e-2, r=8, alpha=16); got {before:.4f} -> {after:.4f}")

    prop()


def _canonical_stack(seed: int, targets: tuple[str, ...], r: int, alpha: float, lora_A: dict[str, torch.Tensor]):
    """tiny_llama(seed) with every linear but lm_head in bitsandbytes NF4 (quantized by bitsandbytes), peft LoRA
    adapters (A given, B = 0) on the targets."""
    import warnings

    import bitsandbytes.functional as bnb_functional
    import peft

    from lora_lab.conformance.oracles import bnb_linear4bit
    from lora_lab.nf4 import NF4Tensor

    model = tiny_llama(seed)
    for name in _base_linears(model):  # as load_in_4bit: every linear but lm_head in NF4; peft adapts only the targets
        m = model.get_submodule(name)
        packed, state = bnb_functional.quantize_4bit(m.weight.detach(), blocksize=64, quant_type="nf4", compress_statistics=True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, bnb_linear4bit(NF4Tensor.from_bnb(packed, state), m.bias))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
        peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, a in lora_A.items():
            peft_model.base_model.model.get_submodule(name).lora_A["default"].weight.copy_(a)
    return peft_model.train()


@check(
    "training.matches_peft_bitsandbytes",
    requires=("apply_qlora", "training_step"),
    points=8,
    exercise="06",
    hint="The canonical stack scales the adapter path by alpha / r and starts B at zero. Check that every option "
    "you receive (r, alpha, quantization) reaches every layer.",
)
def matches_peft_bitsandbytes(target) -> None:
    """Five steps match peft LoRA on bitsandbytes Linear4bit (same NF4 bytes, same A, B = 0), transformers' loss, torch AdamW."""

    @settings(max_examples=examples(2), phases=NO_SHRINK)
    @given(st.integers(0, 1000), st.sampled_from(((4, 32), (8, 8), (8, 16))))
    def prop(seed, rank_alpha):
        r, alpha = rank_alpha
        model = _seeded_apply(target, seed, r=r, alpha=alpha).train()
        canonical = _canonical_stack(seed, ATTENTION, r, alpha, {n: m.lora_A.detach() for n, m in _adapted(model).items()})
        optimizer, canonical_optimizer = _optimizer(model, 1e-2), _optimizer(canonical, 1e-2)
        batch = collate(generate_products(4, seed=seed))
        for step in range(1, 6):
            got = _as_loss(target.op("training_step")(model, batch, optimizer), step)
            loss = canonical(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            loss.backward()
            canonical_optimizer.step()
            canonical_optimizer.zero_grad()
            _assert_loss(got, loss.item(), f"loss at step {step} vs peft + bitsandbytes (r={r}, alpha={alpha})")

    from lora_lab.conformance.oracles import bitsandbytes_eager

    with bitsandbytes_eager():
        prop()
