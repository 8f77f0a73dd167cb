"""Properties of memory safety (exercises 07 and 08): a kernel touches only the tensors it was given.

Every input is handed over inside a larger allocation whose guard regions hold
a sentinel (``bounds.guarded``), and every kernel launch runs under
``bounds.watch_memory``, which checks each address a load or store touches with
its mask on. Sizes are drawn just past the tile boundaries where masks matter:
a last program with one element, M, N and r one past a power of two, K one NF4
block past a tile, a last NF4 block that is short. For a pure-torch target the
properties hold trivially (torch checks its own bounds); they exist for kernels.
An isolated target gets the same guards and the same watch in its own process,
where its kernels run (``op(..., watch_memory=True)``).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_lab.conformance.errors import CheckFailed, NotSupported
from lora_lab.conformance.judge.autograd import backward, describe_layout
from lora_lab.conformance.judge.bounds import OutOfBounds, guarded, guards_changed, watch_memory
from lora_lab.conformance.judge.compare import seeded_generator
from lora_lab.conformance.judge.formats import has_own_format
from lora_lab.conformance.judge.profiles import NO_SHRINK, examples
from lora_lab.conformance.registry import check
from lora_lab.nf4 import NF4Tensor, quantize_nf4

BOUNDS_HINT = (
    "The detail names the kernel argument and the side: 'past the end' is a load or store beyond the last element "
    "(the last program's block, rows past M or N, columns past K or r, the last NF4 block), 'before the start' a "
    "negative offset. Give every tl.load and tl.store a mask that keeps each offset inside its tensor (and "
    "other=0.0 for the lanes it switches off); a GPU would fault or return garbage there. In backward, dY may come "
    "transposed or as a strided view (autograd gives no contiguous promise): index it with dy.stride(0) and "
    "dy.stride(1), or make it contiguous first."
)
EDGE_SIZES = (1, 2, 3, 17, 33, 65, 129)  # one past a power of two: the last tile holds a single row or column


def guarded_weight(q: NF4Tensor) -> NF4Tensor:
    """``q`` with every tensor field inside its own guarded allocation."""
    guard = lambda t: None if t is None else guarded(t)  # noqa: E731
    return NF4Tensor(guard(q.packed), guard(q.absmax), q.blocksize, q.shape, q.dtype, q.double_quant,
                     guard(q.absmax_code), guard(q.absmax_scale), q.absmax_offset)


def _weight_tensors(q: NF4Tensor) -> dict[str, torch.Tensor]:
    fields = {"packed": q.packed, "absmax": q.absmax, "absmax_code": q.absmax_code, "absmax_scale": q.absmax_scale}
    return {f"weight.{name}": t for name, t in fields.items() if t is not None}


def _run_watched(what: str, call, tensors: dict[str, torch.Tensor]):
    """Run ``call()`` with every kernel launch watched; fail naming the argument and side of any stray access."""
    with watch_memory() as log:
        try:
            out = call()
        except OutOfBounds:
            out = None
    if log.accesses:
        raise CheckFailed(f"{log.accesses[0].describe()} ({what})")
    for name, tensor in tensors.items():
        side = guards_changed(tensor)
        if side:
            raise CheckFailed(f"the memory just {side} of {name} was written ({what})")
    return out


def _assert_finite(out, what: str, inputs: str) -> None:
    if isinstance(out, torch.Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
        raise CheckFailed(f"the output holds NaN although every input is finite: a load read the NaN guard just past "
                          f"the end (or before the start) of one of {inputs} ({what})")


@st.composite
def edge_nf4(draw):
    """An NF4 weight whose element count ends a program's block (or an NF4 block) with a handful of elements.

    Draws: numel of 1, 2, 3, one past a power of two (up to 4097), one short of one, and multiples of the blocksize
    with one or two extra elements; every blocksize; single and double quantization.
    """
    blocksize = draw(st.sampled_from((32, 64, 128, 256, 1024, 4096)))
    past_blocks = st.integers(1, 6).flatmap(lambda k: st.sampled_from((k * blocksize + 1, k * blocksize + 2)))
    numel = draw(st.one_of(st.sampled_from((1, 2, 3, 65, 257, 1025, 4097, 1023, 4095)), past_blocks))
    g = seeded_generator(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from((torch.float32, torch.float16, torch.bfloat16)))
    return quantize_nf4(torch.randn(numel, generator=g).to(dtype), blocksize, draw(st.booleans()))


@check(
    "bounds.dequantize_nf4",
    requires=("dequantize_nf4",),
    points=4,
    exercise="07",
    hint=BOUNDS_HINT,
)
def dequantize_in_bounds(target) -> None:
    """dequantize_nf4 reads and writes only inside its tensors, for element counts that end a block with a few elements.

    Draws ``edge_nf4``: 1, 2, 3 or one past a power of two elements, a short last NF4 block, double quantization.
    """
    if has_own_format(target):
        raise NotSupported("this check draws lora_lab NF4Tensor weights; the target's weights are its own format's")

    @settings(max_examples=examples(12), phases=NO_SHRINK)  # the edge sizes are small already; shrinking re-runs kernels
    @given(edge_nf4())
    def prop(q):
        q = guarded_weight(q)
        what = f"numel={q.numel}, blocksize={q.blocksize}, double_quant={q.double_quant}, {q.dtype}"
        out = _run_watched(what, lambda: target.op("dequantize_nf4", watch_memory=True)(q), _weight_tensors(q))
        _assert_finite(out, what, "packed, absmax and the double-quant statistics")

    prop()


@st.composite
def edge_problems(draw):
    """A QLoRA layer with M, N and r one past a power of two and K one NF4 block past a tile.

    Draws: M, N in (1, 2, 3, 17, 33, 65, 129); r in (1, 3, 5, 17); K = 1 or 3 blocks of 32 or 64 (so 96 or 192 end
    one block past a tile of 64 or 128); a transposed (non-contiguous) x; bias or not; double quantization or not.
    """
    M, N = draw(st.sampled_from(EDGE_SIZES)), draw(st.sampled_from(EDGE_SIZES))
    r, blocksize = draw(st.sampled_from((1, 3, 5, 17))), draw(st.sampled_from((32, 64)))
    K = blocksize * draw(st.sampled_from((1, 3)))
    g = seeded_generator(draw(st.integers(0, 2**31 - 1)))
    weight = quantize_nf4(torch.randn(N, K, generator=g) * 0.05, blocksize, draw(st.booleans()))
    x = torch.randn(M, K, generator=g)
    transposed = draw(st.booleans())
    bias = torch.randn(N, generator=g) * 0.1 if draw(st.booleans()) else None
    return x, weight, torch.randn(r, K, generator=g) / K**0.5, torch.randn(N, r, generator=g) * 0.1, bias, transposed


@check(
    "bounds.qlora_linear",
    requires=("qlora_linear",),
    points=6,
    exercise="08",
    hint=BOUNDS_HINT,
)
def qlora_linear_in_bounds(target) -> None:
    """qlora_linear (forward, and backward where provided) reads and writes only inside its tensors, at tile edges.

    Draws ``edge_problems``: M, N one past a power of two, r of 1, 3, 5 or 17, K one NF4 block past a tile, a
    non-contiguous x; dY comes contiguous, transposed or strided by its shape (``autograd.layout_for``).
    """
    if has_own_format(target):
        raise NotSupported("this check draws lora_lab NF4Tensor weights; the target's weights are its own format's")

    @settings(max_examples=examples(10), phases=NO_SHRINK)
    @given(edge_problems())
    def prop(problem):
        x, weight, lora_A, lora_B, bias, transposed = problem
        x = guarded(x.t().contiguous()).t() if transposed else guarded(x)
        weight = guarded_weight(weight)
        A, B = guarded(lora_A).requires_grad_(), guarded(lora_B).requires_grad_()
        bias = None if bias is None else guarded(bias)
        x.requires_grad_()
        tensors = {"x": x, "lora_A": A, "lora_B": B, **({"bias": bias} if bias is not None else {}), **_weight_tensors(weight)}
        what = (f"x {tuple(x.shape)}{' transposed' if transposed else ''}, N={weight.shape[0]}, r={A.shape[0]}, "
                f"blocksize={weight.blocksize}, double_quant={weight.double_quant}, bias={bias is not None}")
        y = _run_watched(what, lambda: target.op("qlora_linear", watch_memory=True)(x, weight, A, B, 2.0, bias), tensors)
        _assert_finite(y, what, "x, lora_A, lora_B, bias and the weight's tensors")
        if not isinstance(y, torch.Tensor) or not y.requires_grad:
            return

        def take_backward():
            try:  # dY in the layout autograd.backward picks for its shape: a strided one's gaps hold NaN
                backward([y], [torch.ones_like(y)])
            except NotImplementedError:  # the backward kernel is exercise 08's stretch
                return None
            return x.grad

        grad = _run_watched(f"backward, {what}", take_backward, tensors)
        _assert_finite(grad, f"backward, {what}, dY {describe_layout(y.shape)}",
                       "x, lora_A, lora_B and the weight's tensors, or dY's own gaps (a dY read as if contiguous)")

    prop()
