"""Properties of the training step at real scale (exercise 06): logits only where labels are, gradient checkpointing,
a bf16 or fp16 compute dtype.

The step people run on Llama 3 8B differs from the tiny fp32 one in ways that
fail silently: a step that computes ``lm_head`` only at the labelled positions
can pair the wrong logits with the labels, and with gradient checkpointing
(reentrant, on a frozen base) the adapters can get no gradient at all
(transformers#26221, peft#1142). Each check compares the gradients the target's
``training_step`` hands its optimizer with those of the plain computation:
every position's logits and transformers' own loss, without checkpointing.
A compute dtype is checked layer by layer against bitsandbytes' ``Linear4bit``
with the same ``compute_dtype`` (and peft's LoRA on it), within bounds derived
for that dtype.
"""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_lab.conformance.errors import CheckFailed
from lora_lab.conformance.judge.autograd import backward
from lora_lab.conformance.judge.compare import assert_close, seeded_generator
from lora_lab.conformance.judge.model_protocol import MODEL_RTOL, Adapter
from lora_lab.conformance.judge.profiles import NO_SHRINK, examples
from lora_lab.conformance.registry import check
from lora_lab.data import collate, collate_listings, generate_products
from lora_lab.model import tiny_llama


def randomize_B(model, seed: int) -> None:
    """Give every lora_B drawn values: with B = 0, as at the start, every gradient of A is zero and proves nothing."""
    g = seeded_generator(seed)
    pairs = model.adapters()
    for pair in pairs.values():
        pair["lora_B"] = torch.randn(pair["lora_B"].shape, generator=g) * 0.05
    model.set_adapters(pairs)


def recorded_step(model, batch, where: str = "") -> dict[str, torch.Tensor | None]:
    """The gradients the target's training_step computes for the adapters of ``model`` (a handle) on ``batch``."""
    try:
        recorded = model.recorded_step(batch)
    except RuntimeError as exc:
        if "does not require grad" not in str(exc):
            raise
        raise CheckFailed(f"the loss does not require grad {where}, so no adapter can get a gradient ({exc}); under reentrant "
                          "checkpointing that happens when no input of a checkpointed block requires grad") from exc
    if len(recorded) != 1:
        raise CheckFailed(f"training_step called optimizer.step() {len(recorded)} times; expected once")
    return recorded[0]


def assert_gradients(got: dict, expected: dict[str, torch.Tensor], what: str) -> None:
    """Each adapter gradient within MODEL_RTOL of the expected, elementwise plus its tensor's largest (sums cancel)."""
    for name, want in expected.items():
        if got.get(name) is None:
            raise CheckFailed(f"{name} received no gradient {what}")
        allowed = MODEL_RTOL * (want.abs() + want.abs().max())
        assert_close(got[name], want, allowed, f"gradient of {name} {what}")


def full_logits_gradients(model, batch) -> dict[str, torch.Tensor]:
    """Adapter gradients of transformers' own loss over every position's logits (it shifts the labels internally).

    The loss and its gradient in the logits are computed here; the model (a handle) only carries that gradient back
    through itself to its adapters.
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = model.logits(batch).requires_grad_()
    loss = ForCausalLMLoss(logits, batch["labels"], vocab_size=logits.shape[-1])
    (grad_logits,) = torch.autograd.grad(loss, [logits])
    return model.adapter_gradients(batch, grad_logits)


def _batch(kind: str, size: int, seed: int) -> dict[str, torch.Tensor]:
    products = generate_products(size, seed=seed)
    return collate(products) if kind == "prices" else collate_listings(products)


@check(
    "training.gradients_match_full_logits",
    requires=("apply_qlora", "training_step"),
    points=6,
    exercise="06",
    hint="The loss needs logits only at the positions whose NEXT token is labelled. If you compute lm_head at some "
    "positions only, make sure position t is paired with label t + 1, in the same order on both sides.",
)
def gradients_match_full_logits(target) -> None:
    """training_step's adapter gradients equal those of transformers' loss over every position's logits."""

    @settings(max_examples=examples(2), phases=NO_SHRINK)
    @given(st.integers(0, 1000), st.sampled_from(("prices", "listings")), st.integers(1, 4))
    def prop(seed, kind, size):
        model = target.model(seed)
        model.train()
        randomize_B(model, seed)
        batch = _batch(kind, size, seed)
        expected = full_logits_gradients(model, batch)
        got = recorded_step(model, batch)
        assert_gradients(got, expected, f"vs every position's logits ({kind}, batch of {size})")

    prop()


@check(
    "training.gradient_checkpointing",
    requires=("apply_qlora", "training_step"),
    points=6,
    exercise="06",
    hint="Reentrant checkpointing recomputes a block only for inputs that require grad, and with a frozen base the "
    "embeddings' output does not: make the model's input require grad (model.enable_input_require_grads()), "
    "and never detach what flows into the decoder layers.",
)
def gradient_checkpointing(target) -> None:
    """With gradient checkpointing (reentrant or not, enabled before or after apply_qlora) the adapters get the same gradients."""

    @settings(max_examples=examples(1), phases=NO_SHRINK)
    @given(st.integers(0, 1000))
    def prop(seed):
        plain = target.model(seed)
        plain.train()
        randomize_B(plain, seed)
        batch = collate(generate_products(2, seed=seed))
        expected = recorded_step(plain, batch)
        for reentrant, before_apply in itertools.product((True, False), repeat=2):  # each way of turning it on
            kind = "reentrant" if reentrant else "non-reentrant"
            checkpointed = target.model(seed, checkpointing=kind) if before_apply else target.model(seed)
            if not before_apply:
                checkpointed.enable_checkpointing(reentrant)
            checkpointed.train()
            checkpointed.set_adapters(plain.adapters())
            where = (f"with {'reentrant' if reentrant else 'non-reentrant'} checkpointing enabled "
                     f"{'before' if before_apply else 'after'} apply_qlora")
            got = recorded_step(checkpointed, batch, where)
            missing = [name for name, g in got.items() if g is None]
            if missing:
                raise CheckFailed(f"{len(missing)} of {len(got)} adapters received no gradient {where}, e.g. {missing[0]}; "
                                  "without checkpointing they all do")
            assert_gradients(got, expected, where)

    prop()


def _bnb_oracle(dense_linear, dtype: torch.dtype, pair, scaling: float):
    """The layer as bitsandbytes + peft make it: ``Linear4bit(compute_dtype=dtype)`` (bitsandbytes' own quantization),
    with peft's LoRA holding ``pair``'s values when the layer is adapted; and its NF4 weight."""
    from lora_lab.conformance.judge.oracles import bnb_linear4bit, peft_bnb_layer
    from lora_lab.conformance.properties.qlora import Problem
    from lora_lab.nf4 import NF4Tensor
    from lora_lab.targets.libraries import bitsandbytes

    packed, state = bitsandbytes().functional.quantize_4bit(dense_linear.weight.detach(), blocksize=64, quant_type="nf4",
                                                            compress_statistics=True)
    weight = NF4Tensor.from_bnb(packed, state)
    if pair is None:
        layer = bnb_linear4bit(weight, dense_linear.bias, compute_dtype=dtype)
        base = layer
    else:
        problem = Problem(None, weight, pair.lora_A.detach(), pair.lora_B.detach(), scaling, dense_linear.bias)
        layer, _ = peft_bnb_layer(problem)
        base = layer.base_layer
    base.compute_dtype, base.compute_type_is_set = dtype, True
    return layer.train(), weight


def _layer_bounds(x, weight, pair, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """2 x the product bound of the layer's output in ``dtype``: both sides round, each within one bound."""
    from lora_lab.conformance.judge.compare import product_bound
    from lora_lab.nf4 import dequantize_nf4

    ax = x.detach().double().abs().reshape(-1, x.shape[-1])
    magnitude = ax @ dequantize_nf4(weight).double().abs().t()
    reduction = x.shape[-1]
    if pair is not None:
        aa, ab = pair.lora_A.detach().double().abs(), pair.lora_B.detach().double().abs()
        magnitude = magnitude + abs(scaling) * (ax @ aa.t()) @ ab.t()
        reduction += aa.shape[0]
    return 2 * product_bound(magnitude, reduction, dtype).reshape(*x.shape[:-1], -1)


def _input_grad_bounds(grad_out, weight, pair, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """2 x the product bound of dX = dY W + s (dY B) A, summed over N then r, in ``dtype``."""
    from lora_lab.conformance.judge.compare import product_bound
    from lora_lab.nf4 import dequantize_nf4

    g = grad_out.double().abs().reshape(-1, grad_out.shape[-1])
    magnitude = g @ dequantize_nf4(weight).double().abs()
    reduction = grad_out.shape[-1]
    if pair is not None:
        aa, ab = pair.lora_A.detach().double().abs(), pair.lora_B.detach().double().abs()
        magnitude = magnitude + abs(scaling) * (g @ ab) @ aa
        reduction += aa.shape[0]
    return 2 * product_bound(magnitude, reduction, dtype).reshape(*grad_out.shape[:-1], -1)


@check(
    "qlora.apply_compute_dtype_matches_bitsandbytes",
    requires=("apply_qlora",),
    points=6,
    exercise="06",
    hint="compute_dtype is bitsandbytes' bnb_4bit_compute_dtype: cast x to it, compute both paths in it (the fp32 "
    "adapters are cast for the matmul), and cast the result back to x's dtype.",
)
def apply_compute_dtype_matches_bitsandbytes(target) -> None:
    """With compute_dtype bf16/fp16 each quantized layer casts x to it, matches Linear4bit + peft in y and dX, keeps x's dtype."""

    @settings(max_examples=examples(2), phases=NO_SHRINK)
    @given(st.integers(0, 1000), st.sampled_from((torch.bfloat16, torch.float16)))
    def prop(seed, dtype):
        r, alpha = 8, 16
        model = target.model(seed, r=r, alpha=alpha, compute_dtype=dtype)
        model.train()
        randomize_B(model, seed)
        dense, g = tiny_llama(seed), seeded_generator(seed)
        pairs = {name: Adapter(pair["lora_A"], pair["lora_B"]) for name, pair in model.adapters().items()}
        names = model.quantized_layer_names()
        if not names:
            raise CheckFailed("found no quantized layer after apply_qlora")
        for name in names:
            reference = dense.get_submodule(name)
            oracle, weight = _bnb_oracle(reference, dtype, pairs.get(name), alpha / r)
            x = torch.randn(3, 7, reference.in_features, generator=g).requires_grad_()  # as inside a model being trained
            grad_out = torch.randn(3, 7, reference.out_features, generator=g)
            where = f"{name} with compute_dtype={str(dtype).replace('torch.', '')}"
            # y, the dtypes of the x-sized tensors the layer made, and dX for grad_out, all from the target's process
            y, created, x_grad = model.layer_forward(name, x, grad_out)
            if dtype not in created:
                raise CheckFailed(f"{where} made no {str(dtype).replace('torch.', '')} copy of its fp32 input: it does not "
                                  "compute in compute_dtype")
            if not isinstance(y, torch.Tensor) or y.dtype != x.dtype:
                raise CheckFailed(f"{where}: expected the output in x's dtype {x.dtype} (as Linear4bit), got "
                                  f"{getattr(y, 'dtype', type(y).__name__)}")
            x_oracle = x.detach().clone().requires_grad_()
            y_oracle = oracle(x_oracle)
            assert_close(y, y_oracle, _layer_bounds(x, weight, pairs.get(name), alpha / r, dtype),
                         f"{where} vs bitsandbytes Linear4bit + peft")
            backward([y_oracle], [grad_out])
            if x_grad is None:
                raise CheckFailed(f"{where}: no gradient reached x through the layer; expected dX = dY W + s (dY B) A")
            assert_close(x_grad, x_oracle.grad, _input_grad_bounds(grad_out, weight, pairs.get(name), alpha / r, dtype),
                         f"gradient of x through {where} vs bitsandbytes Linear4bit + peft")

    from lora_lab.targets.libraries import bitsandbytes_eager

    with bitsandbytes_eager():
        prop()
