"""Properties of the loss (exercise 04).

Oracles: an independent float64 shift-and-mask cross-entropy, and transformers'
own loss (``LlamaForCausalLM(..., labels=...)`` shifts the labels internally).
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_lab.conformance.errors import CheckFailed
from lora_lab.conformance.judge.compare import (
    UNIT_ROUNDOFF,
    add_outliers,
    assert_close,
    assert_rejects,
    call_guarded,
    seeded_generator,
)
from lora_lab.conformance.judge.contract import refill_tail
from lora_lab.conformance.judge.profiles import NO_SHRINK, examples, run_seed
from lora_lab.conformance.registry import check
from lora_lab.data import collate, generate_products

U32 = UNIT_ROUNDOFF[torch.float32]


def _loss_allowance(logits: torch.Tensor, loss: float) -> float:
    """Rounding of an fp32 log-sum-exp over the vocabulary, averaged over the labelled positions."""
    return 16 * U32 * (1 + float(logits.detach().abs().max()) + math.log(logits.shape[-1]) + abs(loss))


def _scalar_loss(value, name: str) -> torch.Tensor:
    """The loss is a 0-d float32 tensor, as torch's and transformers' are: not (1, 1), not float64, not a Python float."""
    if not isinstance(value, torch.Tensor) or value.dim() != 0 or value.dtype != torch.float32:
        got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise CheckFailed(f"{name} must return a 0-d float32 tensor (a scalar that can be backpropagated, computed in "
                          f"float32 even from half-precision logits), got {got}")
    return value


@st.composite
def loss_problems(draw):
    """Logits and labels with drawn sizes, dtype, right padding, a random mask, an ignore_index and sometimes an outlier."""
    batch, length, vocab = draw(st.integers(1, 4)), draw(st.integers(2, 24)), draw(st.integers(2, 300))
    dtype = draw(st.sampled_from((torch.float32, torch.float16, torch.bfloat16)))
    ignore_index = draw(st.sampled_from((-100, -1)))
    g = seeded_generator(draw(st.integers(0, 2**31 - 1)))
    logits = (torch.randn(batch, length, vocab, generator=g) * draw(st.sampled_from((0.1, 1.0, 8.0)))).to(dtype)
    if draw(st.booleans()):  # a confident outlier logit; in bf16 past fp16's range, where an fp16 softmax is NaN
        logits = add_outliers(logits, 1, g, signed=False)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[torch.rand(batch, length, generator=g) < draw(st.sampled_from((0.0, 0.5, 0.9)))] = ignore_index
    for row in range(batch):  # right padding
        labels[row, length - draw(st.integers(0, length - 1)) :] = ignore_index
    if (labels[:, 1:] == ignore_index).all():
        labels[0, -1] = int(torch.randint(0, vocab, (1,), generator=g))
    return logits, labels, ignore_index


def _float64_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """-mean log p(label[t+1] | logits[t]) over labelled positions, and its gradient, in float64."""
    log_probs = logits[:, :-1].double().log_softmax(-1)
    targets = labels[:, 1:]
    valid = targets != ignore_index
    picked = log_probs[valid].gather(1, targets[valid][:, None])
    n = int(valid.sum())
    grad = torch.zeros(logits.shape, dtype=torch.float64)
    rows = log_probs.exp()
    rows[valid] = rows[valid].scatter_add(1, targets[valid][:, None], -torch.ones(n, 1, dtype=torch.float64))
    grad[:, :-1] = torch.where(valid[..., None], rows, 0.0) / n
    return -picked.mean(), grad


@check(
    "loss.matches_shift_and_mask",
    requires=("next_token_loss",),
    points=8,
    exercise="04",
    hint="A causal model's logits at position t are its guess for the token at t+1, so logits and labels must be "
    "offset by one before they meet. Only labels that are not ignore_index count, in the sum and in what you divide by. "
    "Half-precision logits lose too much in a log-sum-exp over the vocabulary.",
)
def matches_shift_and_mask(target) -> None:
    """Loss and its gradient equal a float64 shift-and-mask cross-entropy, for any padding, mask, dtype and length.

    Draws ``loss_problems``: batch 1-4, length 2-24, vocabulary 2-300, fp32/fp16/bf16 logits, ignore_index -100 or
    -1, random masks and right padding; then ``long_loss_problem``: sequences of 1,090 to 2,048 positions (a loss
    that stops after a few hundred positions passes every short one), from the run's seed.
    """

    @settings(max_examples=examples(25))
    @given(loss_problems())
    def prop(problem):
        _check_against_float64(target, *problem)

    prop()
    _check_against_float64(target, *long_loss_problem())


def long_loss_problem() -> tuple[torch.Tensor, torch.Tensor, int]:
    """One batch of sequences of 1,090 to 2,048 positions at a small vocabulary (64), drawn from the run's seed:
    half the labels masked, at most 64 positions of right padding, so labels past position 1,024 always count."""
    g = seeded_generator(run_seed("loss: long sequence"))
    batch, length = int(torch.randint(1, 3, (1,), generator=g)), int(torch.randint(1090, 2049, (1,), generator=g))
    dtype = (torch.float32, torch.bfloat16, torch.float16)[int(torch.randint(0, 3, (1,), generator=g))]
    logits = (torch.randn(batch, length, 64, generator=g) * 2).to(dtype)
    labels = torch.randint(0, 64, (batch, length), generator=g)
    labels[torch.rand(batch, length, generator=g) < 0.5] = -100
    for row in range(batch):
        labels[row, length - int(torch.randint(0, 65, (1,), generator=g)) :] = -100
    labels[:, 1025] = 0  # a label past position 1,024 in every row, whatever the mask drew (padding starts past 1,025)
    return logits, labels, -100


def _check_against_float64(target, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> None:
    """The target's loss and gradient on (logits, labels) against float64, then on logits refilled in place."""
    expected, expected_grad = _float64_loss_and_grad(logits, labels, ignore_index)
    logits = logits.clone().requires_grad_(True)
    loss = _scalar_loss(
        call_guarded(target.op("next_token_loss"), logits, labels, ignore_index=ignore_index, name="next_token_loss",
                     deterministic=True),
        "next_token_loss",
    )
    where = f"logits {tuple(logits.shape)} {logits.dtype}, {int((labels[:, 1:] != ignore_index).sum())} labels"
    assert_close(loss, expected, _loss_allowance(logits, float(expected)), f"loss ({where})")
    loss.backward()
    if logits.grad is None:
        raise CheckFailed("the loss is not differentiable: logits.grad is None after loss.backward()")
    n = int((labels[:, 1:] != ignore_index).sum())
    info = torch.finfo(logits.dtype)  # the gradient is rounded to the logits' dtype, subnormal spacing included
    allowed = 4 * UNIT_ROUNDOFF[logits.dtype] * expected_grad.abs() + 16 * U32 * (expected_grad.abs() + 1 / n)
    allowed = allowed + info.smallest_normal * info.eps
    assert_close(logits.grad, expected_grad, allowed, f"d loss / d logits ({where})")
    fresh = logits.detach()  # the same storage and prefix, a new tail: a cached loss is stale here
    refill_tail([fresh], seeded_generator(n))
    expected, _ = _float64_loss_and_grad(fresh, labels, ignore_index)
    loss = _scalar_loss(call_guarded(target.op("next_token_loss"), fresh, labels, ignore_index=ignore_index,
                                     name="next_token_loss"), "next_token_loss")
    assert_close(loss, expected, _loss_allowance(fresh, float(expected)), f"loss, logits refilled in place ({where})")


@check(
    "loss.matches_transformers",
    requires=("next_token_loss",),
    points=6,
    exercise="04",
    stack=("transformers.models.llama.modeling_llama",),
    hint="transformers takes labels aligned with input_ids and does the offsetting itself: "
    "model(input_ids, labels=labels).loss is what your loss must reproduce from the same logits and labels.",
)
def matches_transformers(target) -> None:
    """Equals LlamaForCausalLM's own loss (labels=...) on price prompts and on fully labelled listings."""
    from lora_lab.conformance.isolation.stack import stack
    from lora_lab.data import collate_listings

    transformers_loss = stack().op("ORACLE.transformers_loss")  # tiny_llama(0) and its loss, in their own process

    @settings(max_examples=examples(8), phases=NO_SHRINK)
    @given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.booleans())
    def prop(seed, batch_size, price_only):
        products = generate_products(batch_size, seed=seed)
        batch = collate(products) if price_only else collate_listings(products)
        logits, loss = transformers_loss(0, batch["input_ids"], batch["attention_mask"], batch["labels"])
        got = _scalar_loss(call_guarded(target.op("next_token_loss"), logits, batch["labels"], name="next_token_loss"),
                           "next_token_loss")
        what = f"loss on {batch_size} {'price prompts' if price_only else 'listings'} vs transformers' loss"
        assert_close(got, loss, _loss_allowance(logits, float(loss)), what)

    prop()


@check(
    "loss.rejects_bad_input",
    requires=("next_token_loss",),
    points=3,
    exercise="04",
    hint="What is the mean over zero tokens? Decide what should happen when no label survives the offset and the mask, "
    "or when logits and labels disagree in shape, before computing anything.",
)
def rejects_bad_input(target) -> str:
    """No labelled token, or logits and labels of different batch or length: each is refused with a clear exception, not NaN."""
    loss = target.op("next_token_loss")
    logits = torch.randn(2, 5, 11)
    only_first = torch.full((2, 5), -100)
    only_first[:, 0] = 3
    cases = {
        "every label = -100": (logits, torch.full((2, 5), -100)),
        "only position 0 labelled (nothing predicts it)": (logits, only_first),
        "labels one position longer than the logits": (logits, torch.randint(0, 11, (2, 6))),
        "labels for a different batch size": (logits, torch.randint(0, 11, (3, 5))),
    }
    return assert_rejects(loss, cases, "next_token_loss")

LLAMA3_VOCAB = 128_256


@check(
    "loss.llama_vocab",
    requires=("next_token_loss",),
    points=2,
    exercise="04",
    hint="Llama 3's vocabulary has 128,256 tokens: a token id needs more than 16 bits, and a log-sum-exp over that "
    "many bf16 logits must be computed in float32.",
    timed=True,
)
def llama_vocab(target) -> None:
    """Over Llama 3's 128,256-token vocabulary (bf16 logits, ids past 65,535), loss and gradient equal the float64 ones."""
    g = seeded_generator(LLAMA3_VOCAB)
    logits = (torch.randn(2, 12, LLAMA3_VOCAB, generator=g) * 2).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(65_536, LLAMA3_VOCAB, (2, 12), generator=g)  # every id needs a 17th bit
    labels[:, :4] = -100  # the prompt
    expected, expected_grad = _float64_loss_and_grad(logits.detach(), labels, -100)
    loss = _scalar_loss(call_guarded(target.op("next_token_loss"), logits, labels, name="next_token_loss"), "next_token_loss")
    where = f"logits {tuple(logits.shape)} bf16, token ids up to {int(labels.max()):,}"
    assert_close(loss, expected, _loss_allowance(logits, float(expected)), f"loss ({where})")
    loss.backward()
    n = int((labels[:, 1:] != -100).sum())
    allowed = 4 * UNIT_ROUNDOFF[torch.bfloat16] * expected_grad.abs() + 16 * U32 * (expected_grad.abs() + 1 / n)
    allowed = allowed + torch.finfo(torch.bfloat16).smallest_normal  # as in matches_shift_and_mask: subnormal spacing
    assert_close(logits.grad, expected_grad, allowed, f"d loss / d logits ({where})")
