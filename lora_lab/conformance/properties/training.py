"""Properties of training_step (exercise 06): the lecture's four steps, on a tiny Llama.

Oracles: lora_lab's reference on an identical model, and the canonical stack,
peft's LoRA on the targets of a model whose every linear layer but lm_head is a
bitsandbytes ``Linear4bit`` (as ``load_in_4bit`` makes it), trained with
transformers' loss and torch's AdamW. bitsandbytes is kept in train mode: in eval
mode its CPU path repacks the weight and computes approximately in bf16 (with AVX512-BF16).
"""

from __future__ import annotations

import math

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lora_lab.conformance.errors import CheckFailed
from lora_lab.conformance.judge.compare import assert_close, assert_equal
from lora_lab.conformance.judge.model_protocol import ATTENTION, MODEL_RTOL, U32, adapters, dense_linear_names
from lora_lab.conformance.judge.profiles import NO_SHRINK, examples
from lora_lab.conformance.registry import check
from lora_lab.data import VOCAB_SIZE, collate, generate_products
from lora_lab.model import tiny_llama

TRAINING_HINT = (
    "A training step is the lecture's four steps, in order. Think about what each leaves behind for the next call: "
    "gradients accumulate in .grad until they are cleared, and the loss worth reporting is the one the gradients came from."
)
LOWERS_LOSS_STEPS, LOWERS_LOSS_MARGIN = 10, 0.10  # lora_lab's reference lowers it by about 16-18% (lr 1e-2, r 8)
# AdamW moves an element by at most about lr a step (|m_hat / sqrt(v_hat)| <= 1), and two correct stacks whose
# gradients differ only by rounding can disagree in m_hat / sqrt(v_hat) far more than in the gradients where an
# element's gradient changes sign between steps (peft on bitsandbytes vs lora_lab: up to 0.4% of lr after 4 steps).
# So the adapters are compared to 1/64 of the most AdamW can move them: a wrong update (a wrong lr, a missed or
# doubled step, unscaled or unmasked gradients) moves most elements by a good part of lr. The losses, which rounding
# does not amplify, are compared to rounding.
ADAM_RESOLUTION = 1 / 64


def _optimizer(model, lr: float, weight_decay: float = 0.01) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay, foreach=False)


def _trained(target, seed: int, lr: float, weight_decay: float = 0.01, every_parameter: bool = False, **kwargs):
    """The target's QLoRA tiny_llama (a handle) in train mode, with torch's AdamW over its trainable parameters."""
    model = target.model(seed, **kwargs)
    model.train()
    model.make_optimizer(lr, weight_decay, every_parameter)
    return model


def _twins(target, seed: int, r: int, alpha: float, lr: float):
    """The target's QLoRA tiny_llama (a handle) and lora_lab's, holding the same adapter values (the target's)."""
    from lora_lab.model import apply_qlora as reference_apply

    model = _trained(target, seed, lr, r=r, alpha=alpha)
    reference = reference_apply(tiny_llama(seed), r=r, alpha=alpha).train()
    adapted, reference_adapted = model.adapters(), adapters(reference)
    if sorted(adapted) != sorted(reference_adapted):
        raise CheckFailed(f"expected adapters on {sorted(reference_adapted)}, got them on {sorted(adapted)}")
    with torch.no_grad():
        for name, m in reference_adapted.items():
            m.lora_A.copy_(adapted[name]["lora_A"])
            m.lora_B.copy_(adapted[name]["lora_B"])
    return model, reference


def _price_loss(model, batch) -> float:
    """The loss of the target's model on ``batch``, computed here from the logits it returns."""
    from lora_lab.loss import next_token_loss

    return next_token_loss(model.logits(batch), batch["labels"]).item()


def _as_loss(value, step: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckFailed(f"training_step must return the loss as a Python float (loss.item()), got {type(value).__name__} "
                          f"at step {step}; a tensor would keep the whole autograd graph alive")
    return float(value)


def _assert_loss(got: float, expected: float, what: str, steps: int = 1) -> None:
    """Within the rounding of an fp32 log-sum-exp over the vocabulary, once per step taken (differences accumulate)."""
    allowed = steps * 16 * U32 * (1 + abs(expected)) * math.sqrt(VOCAB_SIZE)
    assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), allowed, what)


def left_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same prompts with the padding moved to the left: the attention mask then decides what each token sees."""
    out = {key: value.clone() for key, value in batch.items()}
    for row, length in enumerate(batch["attention_mask"].sum(1).tolist()):
        for key in ("input_ids", "attention_mask", "labels"):
            out[key][row] = batch[key][row].roll(batch[key].shape[1] - int(length))
    return out


def with_more_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Row i also labels its last 2i unlabelled tokens (their own ids): rows with 1, 3, 5, ... labels, where the mean
    over every label and the mean of each row's mean differ (with one label a row they are the same number)."""
    labels = batch["labels"].clone()
    for row in range(1, labels.shape[0]):
        free = ((batch["attention_mask"][row] == 1) & (labels[row] == -100)).nonzero().flatten()[-2 * row :]
        labels[row, free] = batch["input_ids"][row, free]
    return {**batch, "labels": labels}


def _first_wrong_step_cause(step: int, batch_size: int) -> str:
    """Which part of the four steps a first mismatch at ``step`` points to."""
    if step == 1:
        mask = " with the attention_mask (the prompts are left-padded)" if batch_size > 1 else ""
        return (f"already wrong at step 1, before any update: the forward pass or the loss differ, not the clearing "
                f"of gradients; call the model on input_ids{mask} and use the next-token loss")
    return (f"step 1 agreed, step {step} did not: the forward pass and the loss are right, so look at what a step "
            "leaves behind for the next one (.grad cleared after the update, the update's order)")


@check(
    "training.matches_reference",
    requires=("apply_qlora", "training_step"),
    points=10,
    exercise="06",
    hint=TRAINING_HINT + " The detail says whether step 1 already differs (the forward pass or the loss: is the "
    "attention_mask passed? is the loss the mean over every label of the batch, not of each row's mean?) or only a "
    "later step (what happens to .grad between calls).",
)
def matches_reference(target) -> None:
    """Four training steps give the same losses and adapters as lora_lab's training_step on an identical model.

    Always once with three prompts holding 1, 3 and 5 labels (``with_more_labels``): the loss is a mean over labels,
    not over sequences."""
    from lora_lab.train import training_step as reference_step

    @settings(max_examples=examples(3), phases=NO_SHRINK)
    @given(st.integers(0, 1000), st.sampled_from((4, 8)), st.sampled_from((8, 32)), st.sampled_from((1e-3, 1e-2)),
           st.integers(1, 4))
    @example(11, 4, 8, 1e-2, 3)
    def prop(seed, r, alpha, lr, batch_size):
        model, reference = _twins(target, seed, r, alpha, lr)
        reference_optimizer = _optimizer(reference, lr)
        steps = 4
        for step in range(1, steps + 1):
            batch = with_more_labels(left_padded(collate(generate_products(batch_size, seed=1000 * seed + step))))
            got = _as_loss(model.training_step(batch), step)
            expected = reference_step(reference, batch, reference_optimizer)
            try:
                _assert_loss(got, expected, f"loss returned by step {step} (r={r}, alpha={alpha}, lr={lr}, "
                                            f"{batch_size} prompt(s), left-padded, 1 to {2 * batch_size - 1} labels a row)")
            except CheckFailed as failure:
                raise CheckFailed(f"{failure}; {_first_wrong_step_cause(step, batch_size)}") from None
        trained = model.adapters()
        for name, m in adapters(reference).items():
            for which in ("lora_A", "lora_B"):
                expected = getattr(m, which).detach()
                assert_close(trained[name][which], expected, MODEL_RTOL * expected.abs() + ADAM_RESOLUTION * lr * steps,
                             f"{name}.{which} after {steps} steps (lr={lr})")

    prop()


@check(
    "training.returns_loss_before_update",
    requires=("apply_qlora", "training_step"),
    points=4,
    exercise="06",
    hint=TRAINING_HINT + " Which forward pass's loss should the caller see, and as what type? And leave "
    "model.train()/model.eval() to the caller: a step that switches the mode undoes their choice.",
)
def returns_loss_before_update(target) -> None:
    """training_step returns, as a float, the loss of the model as it was before this step, and it does update;
    it leaves the model's train/eval mode (the caller's choice) as it found it, in every submodule."""

    @settings(max_examples=examples(2), phases=NO_SHRINK)
    @given(st.integers(0, 1000))
    def prop(seed):
        model = _trained(target, seed, 1e-2)
        batch = collate(generate_products(2, seed=seed))
        for step in (1, 2):
            before = _price_loss(model, batch)
            previous = model.adapters()
            got = _as_loss(model.training_step(batch), step)
            _assert_loss(got, before, f"loss returned by step {step} vs the loss before that step's update")
            now = model.adapters()
            if all(torch.equal(now[n][w], previous[n][w]) for n in previous for w in ("lora_A", "lora_B")):
                raise CheckFailed(f"step {step} left every adapter unchanged: the optimizer did not update them")
        for mode in ("eval", "train"):  # the caller's choice of mode, e.g. eval() to switch dropout off, must survive
            model.train(mode == "train")
            model.training_step(batch)
            changed = sorted(name or "the model" for name, training in model.modes().items() if training != (mode == "train"))
            if changed:
                raise CheckFailed(f"training_step changed the mode the caller set with model.{mode}() ({changed[0]} is now "
                                  f"in {'train' if mode == 'eval' else 'eval'} mode): do not call model.train() or "
                                  "model.eval() inside it, the mode is the caller's choice")

    prop()


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
        model = _trained(target, seed, 1e-2, weight_decay=0.1, every_parameter=True)
        before = model.frozen_state()
        if not model.quantized_layer_names():
            raise CheckFailed("found no quantized weight after apply_qlora (every layer holds a dense floating-point weight)")
        batch = collate(generate_products(2, seed=seed))
        for _ in range(3):
            model.training_step(batch)
        after = model.frozen_state()
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
        model = _trained(target, seed, 1e-2, r=8, alpha=16)
        batch = collate(generate_products(2, seed=seed))
        before = _price_loss(model, batch)
        for _ in range(LOWERS_LOSS_STEPS):
            model.training_step(batch)
        after = _price_loss(model, batch)
        if after > (1 - LOWERS_LOSS_MARGIN) * before:
            raise CheckFailed(f"expected the loss on the same 2 prompts to fall by at least {LOWERS_LOSS_MARGIN:.0%} in "
                              f"{LOWERS_LOSS_STEPS} steps (AdamW lr=1e-2, r=8, alpha=16); got {before:.4f} -> {after:.4f}")

    prop()


def _canonical_stack(seed: int, targets: tuple[str, ...], r: int, alpha: float, lora_A: dict[str, torch.Tensor],
                     use_rslora: bool = False):
    """tiny_llama(seed) with every linear but lm_head in bitsandbytes NF4 (quantized by bitsandbytes), peft LoRA
    adapters (A given, B = 0) on the targets, scaled by alpha / r (alpha / sqrt(r) with ``use_rslora``)."""
    import warnings

    from lora_lab.conformance.judge.oracles import bnb_linear4bit
    from lora_lab.nf4 import NF4Tensor
    from lora_lab.targets.libraries import bitsandbytes, peft_module

    model = tiny_llama(seed)
    for name in dense_linear_names(model):  # as load_in_4bit: every linear but lm_head in NF4; peft adapts only the targets
        m = model.get_submodule(name)
        packed, state = bitsandbytes().functional.quantize_4bit(m.weight.detach(), blocksize=64, quant_type="nf4",
                                                                compress_statistics=True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, bnb_linear4bit(NF4Tensor.from_bnb(packed, state), m.bias))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = peft_module()
        config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                                 use_rslora=use_rslora)
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
    hint="The canonical stack scales the adapter path by alpha / r (alpha / sqrt(r) with use_rslora) and starts B at "
    "zero. Check that every option you receive (r, alpha, use_rslora, quantization) reaches every layer.",
)
def matches_peft_bitsandbytes(target) -> None:
    """Five steps match peft LoRA on bitsandbytes Linear4bit (same NF4 bytes, same A, B = 0), transformers' loss, torch AdamW.

    Always once with use_rslora (r = 16, alpha = 16: scaling 4, not 1), which apply_qlora must pass on to its layers."""

    @settings(max_examples=examples(2), phases=NO_SHRINK)
    @given(st.integers(0, 1000), st.sampled_from(((4, 32, False), (8, 8, False), (8, 16, False), (16, 16, True))))
    @example(7, (16, 16, True))
    def prop(seed, options):
        r, alpha, use_rslora = options
        model = _trained(target, seed, 1e-2, r=r, alpha=alpha, **({"use_rslora": True} if use_rslora else {}))
        canonical = _canonical_stack(seed, ATTENTION, r, alpha, {n: pair["lora_A"] for n, pair in model.adapters().items()},
                                     use_rslora)
        canonical_optimizer = _optimizer(canonical, 1e-2)
        batch = collate(generate_products(4, seed=seed))
        for step in range(1, 6):
            got = _as_loss(model.training_step(batch), step)
            loss = canonical(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            loss.backward()
            canonical_optimizer.step()
            canonical_optimizer.zero_grad()
            _assert_loss(got, loss.item(), f"loss at step {step} vs peft + bitsandbytes (r={r}, alpha={alpha}, "
                         f"use_rslora={use_rslora})")

    from lora_lab.targets.libraries import bitsandbytes_eager

    with bitsandbytes_eager():
        prop()
