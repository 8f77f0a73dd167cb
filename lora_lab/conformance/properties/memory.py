"""Memory as a property (exercises 03 and 06): no dense base weight and no fp32 copy of a half-precision activation
is kept between forward and backward.

Measured, not read from the code (``lora_lab.conformance.judge.memory``): what autograd
saves, and which tensors the forward made that are still alive when it returns.

- A layer: with M < min(N, K) rows, any tensor of N x K elements or more is a
  weight, not an activation; one kept for backward is a dense W (dequantized, or
  ``W + s * B @ A``). An fp32 tensor the size of a bf16/fp16 input or output is an
  upcast copy that doubles the activation's memory.
- A model: the tiny Llama in bf16, a batch of 3 prompts. Every activation then
  has a multiple of 3 elements and every weight a power of two, so a kept tensor
  with a quantized layer's N x K elements is that weight, whatever its shape.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_lab.conformance.errors import CheckFailed, NotSupported
from lora_lab.conformance.judge.compare import seeded_generator
from lora_lab.conformance.judge.formats import has_own_format
from lora_lab.conformance.judge.memory import HALF, Seen, assert_no_stray_weights, seen_from_wire
from lora_lab.conformance.judge.profiles import NO_SHRINK, examples
from lora_lab.conformance.properties.qlora import Problem
from lora_lab.conformance.registry import check
from lora_lab.data import collate, generate_products
from lora_lab.nf4 import quantize_nf4

MEMORY_HINT = (
    "What autograd keeps between forward and backward is what your forward saves (and what the ops it calls save). "
    "Keep the NF4 weight itself and dequantize it again in backward; go through the r-wide x @ A^T, never form B @ A; "
    "compute in x's dtype rather than upcasting it."
)


@st.composite
def layer_problems(draw):
    """A QLoRA layer with fewer rows M than N and K, so only a weight can have N x K elements."""
    K = 64 * draw(st.integers(1, 4))
    N = draw(st.integers(65, 160))
    M = draw(st.integers(1, 48))
    r = draw(st.integers(1, 16))
    dtype = draw(st.sampled_from((torch.float32, torch.bfloat16, torch.float16)))
    adapter_dtype = draw(st.sampled_from((dtype, torch.float32)))
    g = seeded_generator(draw(st.integers(0, 2**31 - 1)))
    weight = quantize_nf4((torch.randn(N, K, generator=g) * 0.05).to(dtype), 64, draw(st.booleans()))
    leaf = lambda t: t.requires_grad_()  # noqa: E731
    x = leaf(torch.randn(M, K, generator=g).to(dtype))
    lora_A = leaf((torch.randn(r, K, generator=g) / K**0.5).to(adapter_dtype))
    lora_B = leaf((torch.randn(N, r, generator=g) * 0.1).to(adapter_dtype))
    bias = leaf((torch.randn(N, generator=g) * 0.1).to(dtype)) if draw(st.booleans()) else None
    return Problem(x, weight, lora_A, lora_B, 16 / r, bias)


def _listed(seen: list[Seen]) -> str:
    return ", ".join(str(s) for s in seen[:3]) + (f" and {len(seen) - 3} more" if len(seen) > 3 else "")


def upcast_copies(saved: list[Seen], dtype: torch.dtype, sizes: set[int]) -> list[Seen]:
    """fp32 tensors saved with the element count of a half-precision activation (``sizes``)."""
    return [s for s in saved if dtype in HALF and s.dtype == torch.float32 and s.numel in sizes]


@check(
    "memory.qlora_linear_keeps_no_dense_weight",
    requires=("qlora_linear",),
    points=5,
    exercise="03",
    hint=MEMORY_HINT,
)
def qlora_linear_keeps_no_dense_weight(target) -> None:
    """Between forward and backward qlora_linear keeps no N x K tensor (W dequantized, or B @ A) and no fp32 copy of a half x."""
    if has_own_format(target):
        raise NotSupported("this check draws lora_lab NF4Tensor weights; the target's weights are its own format's")

    @settings(max_examples=examples(4), phases=NO_SHRINK)  # structural: few draws suffice; shrinking would add a minute
    @given(layer_problems())
    def prop(p):
        N, K = p.weight.shape
        where = f"x {tuple(p.x.shape)} {str(p.x.dtype).replace('torch.', '')}, W {N} x {K}, r={p.lora_A.shape[0]}"
        y, saved, alive = target.measured("qlora_linear", N * K, *p.args())
        kept = [s for s in saved + alive if s.dtype.is_floating_point and s.numel >= N * K]
        if kept:
            raise CheckFailed(f"qlora_linear keeps {len(kept)} tensor(s) of N x K = {N * K:,} elements or more for backward: "
                              f"{_listed(kept)} ({where}); a dense weight between forward and backward is what QLoRA avoids")
        copies = upcast_copies(saved, p.x.dtype, {p.x.numel(), p.M * N})
        if copies:
            raise CheckFailed(f"qlora_linear keeps an fp32 copy of its {p.x.dtype} activations for backward: {_listed(copies)} "
                              f"({where}); it doubles their memory")
        if isinstance(y, torch.Tensor) and y.requires_grad:
            y.sum().backward()  # frees the graph, and checks that the kept tensors suffice

    prop()


@check(
    "memory.model_keeps_no_dense_weight",
    requires=("apply_qlora",),
    points=4,
    exercise="06",
    hint=MEMORY_HINT + " In a bf16 model, the adapters' fp32 parameters are cast to bf16 for the matmul, not x to fp32.",
)
def model_keeps_no_dense_weight(target) -> None:
    """A bf16 QLoRA model's forward keeps no quantized layer's N x K weight densely, and no fp32 copy of a layer's bf16 input.

    Measured twice: what the forward saves and leaves alive under the instruments, then, after a forward with none on,
    every tensor alive in the target's process that the model does not reach (a copy kept only while unmeasured).
    """

    @settings(max_examples=examples(1), phases=NO_SHRINK)  # what is kept depends on the code, not the seed's values
    @given(st.integers(0, 1000))
    def prop(seed):
        model = target.model(seed, dtype="bfloat16", census=True)
        model.train()
        batch = collate(generate_products(3, seed=seed))
        found = model.kept_for_backward(batch)  # 3 rows: no power-of-two activation
        if not found["layers"]:
            raise CheckFailed("found no quantized layer after apply_qlora, so nothing to measure")
        kept, copies = seen_from_wire(found["kept"]), seen_from_wire(found["copies"])
        if kept:
            raise CheckFailed(f"the model keeps {len(kept)} tensor(s) with a quantized layer's N x K elements for backward: "
                              f"{_listed(kept)}; QLoRA keeps only the NF4 weights")
        if copies:
            raise CheckFailed(f"in a bf16 model, the quantized layers keep {len(copies)} fp32 copies of their bf16 activations "
                              f"for backward: {_listed(copies)}; each doubles that activation's memory")
        model.logits(batch)  # a forward with no instrument on: what is kept only while nothing measures shows now
        assert_no_stray_weights(model, "after a forward")

    prop()
