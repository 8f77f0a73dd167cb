"""Properties of apply_qlora (exercise 06): adapters on the targets, the whole base in NF4, all else frozen.

Oracle: the dense model with every linear weight but lm_head's replaced by its
dequantized NF4 (QLoRA quantizes the whole base, not only the targets). Every
model here is ``tiny_llama`` (2 layers, hidden 64): a check takes seconds. The
target's model is reached only through its handle (``target.model(seed, ...)``,
see ``model_protocol.ModelHandle``), which may live in another process.
"""

from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lora_lab.conformance.errors import CheckFailed
from lora_lab.conformance.judge.capabilities import supported
from lora_lab.conformance.judge.compare import assert_close, assert_equal, seeded_generator
from lora_lab.conformance.judge.memory import assert_no_stray_weights
from lora_lab.conformance.judge.model_protocol import (
    ATTENTION,
    DENSE_HEAD,
    EVERY_LINEAR,
    MODEL_RTOL,
    adapters,
    dense_linear_names,
    held_bytes,
    is_adapter_name,
    model_logits,
    module_at,
)
from lora_lab.conformance.judge.profiles import NO_SHRINK, examples
from lora_lab.conformance.registry import check
from lora_lab.data import collate, generate_products
from lora_lab.model import tiny_llama

# (blocksize, double_quant): the blocksizes QLoRA uses, small to large; tiny_llama's 64x64 weights hold 4096 values.
QUANTIZATIONS = ((64, True), (64, False), (32, True), (128, False), (256, True))


@check(
    "qlora.apply_trains_only_adapters",
    requires=("apply_qlora",),
    points=8,
    exercise="06",
    hint="After apply_qlora, which tensors may an optimizer change? Everything the model had before (embeddings, "
    "norms, lm_head, the linear layers you did not target) must stop requiring gradients; only the new adapters train. "
    "In a bf16 model they stay fp32: an AdamW step of lr 1e-4 is below bf16's resolution for most entries.",
)
def apply_trains_only_adapters(target) -> None:
    """Exactly the targeted layers get adapters, and after backward only lora_A/lora_B require or hold a gradient; the
    adapters of a bf16 model are fp32."""

    @settings(max_examples=examples(4), phases=NO_SHRINK)
    @given(st.integers(0, 1000), st.sets(st.sampled_from(EVERY_LINEAR), min_size=1), st.sampled_from((1, 4, 8)))
    def prop(seed, targets, r):
        model = target.model(seed, target_modules=tuple(sorted(targets)), r=r, alpha=2 * r)
        adapted = model.adapters()
        dense = tiny_llama(seed)
        expected = sorted(f"model.layers.{i}.{'self_attn' if t in ATTENTION else 'mlp'}.{t}"
                          for i in range(dense.config.num_hidden_layers) for t in targets)
        if sorted(adapted) != expected:
            raise CheckFailed(f"expected adapters on {expected}, got them on {sorted(adapted)}")
        for name, pair in adapted.items():
            shape_a, shape_b = (r, dense.get_submodule(name).in_features), (dense.get_submodule(name).out_features, r)
            if tuple(pair["lora_A"].shape) != shape_a or tuple(pair["lora_B"].shape) != shape_b:
                raise CheckFailed(f"{name}: expected lora_A {shape_a} and lora_B {shape_b}, "
                                  f"got {tuple(pair['lora_A'].shape)} and {tuple(pair['lora_B'].shape)}")
        model.backward_loss(collate(generate_products(2, seed=seed)))
        for name, p in model.parameters().items():
            if is_adapter_name(name):
                if not p["requires_grad"] or p["grad"] is None:
                    raise CheckFailed(f"adapter {name} should be trainable and receive a gradient; it did not")
            elif p["requires_grad"] or p["grad"] is not None:
                raise CheckFailed(f"{name} is not an adapter but requires_grad={p['requires_grad']}, "
                                  f"has a gradient={p['grad'] is not None}; expected it frozen")

    prop()
    for name, pair in target.model(0, dtype="bfloat16").adapters().items():
        for which in ("lora_A", "lora_B"):
            if pair[which].dtype != torch.float32:
                raise CheckFailed(f"in a bf16 model, {name}.{which} is {pair[which].dtype}; expected the adapters in fp32 "
                                  "(as QLoRALinear.from_linear makes them): bf16 rounds most of AdamW's small updates away")


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
        model = target.model(seed, target_modules=tuple(sorted(targets)))
        dense = model.dense_linear_names()
        if dense:
            raise CheckFailed(f"{len(dense)} linear layer(s) kept a dense weight after apply_qlora "
                              f"(target_modules={sorted(targets)}), e.g. {', '.join(dense[:3])}; expected every "
                              f"linear layer but {DENSE_HEAD} in NF4")
        base = dense_linear_names(tiny_llama(seed))
        kinds = model.layer_kinds([*base, DENSE_HEAD])
        for name in base:
            if not kinds[name]["quantized"]:
                raise CheckFailed(f"{name} should hold a quantized weight after apply_qlora (NF4 storage, not a dense "
                                  f"floating-point tensor); its weight is a {kinds[name]['weight_type']}")
        head = kinds[DENSE_HEAD]
        if not head["linear"] or head["quantized"]:
            raise CheckFailed(f"{DENSE_HEAD} should stay a dense nn.Linear (QLoRA leaves the output head unquantized), "
                              f"got a {head['class']} holding a {head['weight_type']}")

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

    # Every blocksize is drawn; under ci (three derandomized examples) the explicit ones make sure 64 is not the only one.
    quantizations = supported(target, "blocksizes", QUANTIZATIONS, pick=lambda q: q[0])
    explicit = [q for q in quantizations if q[0] != 64][:2]

    @settings(max_examples=examples(3), phases=NO_SHRINK)
    @given(st.integers(0, 1000), st.sampled_from(quantizations), st.booleans())
    def prop(seed, quantization, attention_only):
        blocksize, double_quant = quantization
        targets = ATTENTION if attention_only else EVERY_LINEAR
        model = target.model(seed, target_modules=targets, blocksize=blocksize, double_quant=double_quant)
        model.train()
        dense = tiny_llama(seed)
        with torch.no_grad():
            for name in dense_linear_names(dense):  # targets or not: QLoRA quantizes every linear layer but lm_head
                m = dense.get_submodule(name)
                m.weight.copy_(dequantize_nf4(quantize_nf4(m.weight, blocksize, double_quant)))
            batch = collate(generate_products(3, seed=seed))
            where = f"blocksize={blocksize}, double_quant={double_quant}"
            expected = model_logits(dense, batch)
            assert_equal(model.logits(batch), expected, f"logits, fresh adapters vs dequantized base ({where})")

    for seed, quantization in enumerate(explicit):
        prop = example(seed, quantization, seed % 2 == 0)(prop)
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
        model = target.model(seed, dropout=0.5)
        reference = reference_apply(tiny_llama(seed))
        g = seeded_generator(seed)
        with torch.no_grad():
            reference_adapters, target_adapters = adapters(reference), model.adapters()
            for name, pair in target_adapters.items():
                pair["lora_B"] = torch.randn(pair["lora_B"].shape, generator=g) * 0.5
                ref = reference_adapters[name]
                ref.lora_A.copy_(pair["lora_A"])
                ref.lora_B.copy_(pair["lora_B"])
            model.set_adapters(target_adapters)
            batch = collate(generate_products(2, seed=seed))
            model.train(False)
            first, second = model.logits(batch), model.logits(batch)
            assert_equal(second, first, "two eval-mode forward passes with dropout=0.5")
            expected = model_logits(reference.eval(), batch)
            assert_close(first, expected, MODEL_RTOL * (1 + expected.abs()), "eval-mode logits vs the same model without dropout")
            model.train(True)
            if torch.equal(model.logits(batch), model.logits(batch)):
                raise CheckFailed("two train-mode forward passes with dropout=0.5 gave identical logits: dropout is not applied")

    prop()


@check(
    "qlora.apply_rejects_unknown_target",
    requires=("apply_qlora",),
    points=2,
    exercise="06",
    hint="A misspelt target module must not silently train nothing: raise ValueError saying what was not "
    "found and which linear layers exist. No option may be dropped silently either: pass quant_kwargs (use_rslora, "
    "backend) on to QLoRALinear.from_linear, which refuses a backend it does not know.",
)
def apply_rejects_unknown_target(target) -> None:
    """A target name that matches no linear layer raises ValueError that names it; an unknown backend is refused."""
    try:
        target.model(0, target_modules=("q_proj", "qkv_proj"))
    except ValueError as exc:
        if "qkv_proj" not in str(exc):
            raise CheckFailed(f"the ValueError should name the unknown target 'qkv_proj'; it says: {exc}") from exc
    else:
        raise CheckFailed("apply_qlora(model, target_modules=('q_proj', 'qkv_proj')) returned; expected a ValueError")
    try:
        target.model(0, backend="no_such_backend")
    except NotImplementedError:
        raise
    except Exception as exc:  # noqa: BLE001 - any clear refusal: the option reached a layer that checks it
        if str(exc).strip():
            return
    raise CheckFailed("apply_qlora(model, backend='no_such_backend') returned without an error: the option was dropped "
                      "on the way, so backend='triton' (or use_rslora=True) would be dropped as silently")


# What one NF4 layer may hold: 4 bits a weight and an fp32 absmax a block of 64 (an upper bound: double quantization
# stores 8 bits), a quarter more for padding and layout, and 2 KiB for the fixed tables (the 256-value dynamic map,
# the 16 NF4 levels, the scales and offset). A dense copy of the weight beside it, even in bf16, is over 3x this.
NF4_LAYOUT_SLACK, NF4_TABLE_BYTES = 1.25, 2048


def nf4_budget(numel: int, blocksize: int = 64) -> int:
    """Bytes an NF4 layer of ``numel`` weights may hold (see NF4_LAYOUT_SLACK)."""
    return int(NF4_LAYOUT_SLACK * (-(-numel // 2) + 4 * -(-numel // blocksize))) + NF4_TABLE_BYTES


@check(
    "qlora.apply_holds_only_nf4",
    requires=("apply_qlora",),
    points=3,
    exercise="06",
    hint="QLoRA's point is memory: a quantized model must not keep its dense weights around (as an attribute of a "
    "layer or of the model, a buffer or a cache). Keep only the packed codes and the block statistics; dequantize on "
    "the fly in forward.",
)
def apply_holds_only_nf4(target) -> None:
    """A census of every tensor each quantized layer, the model and the target's process hold: no hidden dense copy."""
    dense = tiny_llama(0)
    for double_quant in (True, False):
        model = target.model(0, target_modules=ATTENTION, blocksize=64, double_quant=double_quant, census=True)
        assert_no_stray_weights(model, "after apply_qlora")
        census = model.quantized_layer_bytes()
        if not census:
            raise CheckFailed("found no quantized layer after apply_qlora, so there is nothing whose memory to count")
        for name, held in census.items():
            numel = module_at(dense, name).weight.numel()
            if held > nf4_budget(numel):
                raise CheckFailed(f"{name} holds {held:,} bytes of tensors (adapters left out) for {numel:,} weights "
                                  f"(double_quant={double_quant}); NF4 takes at most {nf4_budget(numel):,}, and a dense "
                                  f"fp32 copy alone is {4 * numel:,}: the layer keeps more than its 4-bit storage")
        # The whole model: what the dense model holds besides these layers' weights (embeddings, norms, lm_head,
        # rotary tables), plus NF4's budget for each; a copy kept anywhere else (the model's own attributes) shows here.
        weights = {name: module_at(dense, name).weight for name in census}
        allowed = held_bytes(dense) - sum(w.numel() * w.element_size() for w in weights.values()) + sum(
            nf4_budget(w.numel()) for w in weights.values())
        held = model.held_bytes()
        if held > allowed:
            raise CheckFailed(f"the model holds {held:,} bytes of tensors (adapters left out; double_quant={double_quant}); "
                              f"its dense parts and NF4 layers need at most {allowed:,}: {held - allowed:,} bytes more, "
                              "a copy kept outside the quantized layers (a dense weight in an attribute of the model?)")
