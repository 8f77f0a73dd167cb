"""Properties of the QLoRA linear op (exercise 03 and the kernels' exercises 07–08).

``qlora_linear(x, weight, lora_A, lora_B, scaling, bias)`` must equal

    y = x @ W^T + bias + scaling * (x @ A^T) @ B^T

computed in float64 from the dequantized weight, within an elementwise bound
derived from the dtype and the length of each sum (see ``compare.product_bound``).
Shapes are drawn to be awkward: M = 1, N and M not multiples of any tile,
3-D inputs, ranks from 1 to 64, every block size the kernels support; x holds
outliers in a third of the draws (in bf16, past fp16's largest number).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_lab.conformance.errors import CheckFailed, NotSupported
from lora_lab.conformance.judge.autograd import backward
from lora_lab.conformance.judge.compare import add_outliers, assert_close, call_guarded, product_bound, seeded_generator
from lora_lab.conformance.judge.contract import refill_tail
from lora_lab.conformance.judge.formats import NF4TENSOR_QUANTIZER, Quantizer, quantizer_for
from lora_lab.conformance.judge.profiles import examples
from lora_lab.conformance.registry import SEMANTIC, check
from lora_lab.nf4 import dequantize_nf4

TALL_M = 5 * 64 + 7  # past several 64-row tiles, and not a multiple of any tile: a dropped partial tile shows


@dataclass
class Problem:
    """One drawn QLoRA layer and input."""

    x: torch.Tensor
    weight: Any  # an NF4Tensor, or the target's own quantized weight
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    bias: torch.Tensor | None
    dense: torch.Tensor | None = None  # float64 (N, K): the weight as its own format dequantizes it (the oracle's W)
    blocksize: int | None = None
    double_quant: bool | None = None

    def __post_init__(self) -> None:
        """An NF4Tensor weight needs no more: its dense W is lora_lab's dequantize (checked against bitsandbytes)."""
        if self.dense is None:
            self.dense = dequantize_nf4(self.weight).double().reshape(self.weight.shape)
            self.blocksize, self.double_quant = self.weight.blocksize, self.weight.double_quant

    @property
    def K(self) -> int:
        return self.x.shape[-1]

    @property
    def M(self) -> int:
        return self.x.numel() // self.K

    def args(self):
        return self.x, self.weight, self.lora_A, self.lora_B, self.scaling, self.bias

    def with_new_values(self, seed: int) -> Problem:
        """Same shapes and weight, fresh activations and adapters: catches cached answers."""
        g = seeded_generator(seed)
        rms = lambda t: t.float().pow(2).mean().sqrt().clamp(min=0.1)  # noqa: E731
        fresh = lambda t: None if t is None else (torch.randn(t.shape, generator=g) * rms(t)).to(t.dtype)  # noqa: E731
        return Problem(fresh(self.x), self.weight, fresh(self.lora_A), fresh(self.lora_B), self.scaling, fresh(self.bias),
                       self.dense, self.blocksize, self.double_quant)

    def with_tensors(self, x, lora_A, lora_B, bias) -> Problem:
        return Problem(x, self.weight, lora_A, lora_B, self.scaling, bias, self.dense, self.blocksize, self.double_quant)


def _supported(values, allowed, what: str) -> tuple:
    kept = tuple(v for v in values if v in allowed)
    if not kept:
        raise NotSupported(f"the format supports none of the {what} {list(values)}")
    return kept


@st.composite
def problems(draw, dtypes=(torch.float32, torch.float16, torch.bfloat16), max_k: int = 512,
             quantizer: Quantizer = NF4TENSOR_QUANTIZER):
    supports = quantizer.supports
    blocksize = draw(st.sampled_from(_supported((32, 64, 128, 256), supports.blocksizes, "blocksizes")))
    K = blocksize * draw(st.integers(1, max(1, max_k // blocksize)))
    N = draw(st.integers(1, 96))
    r = draw(st.one_of(st.integers(1, 8), st.sampled_from((16, 32, 64))))
    lead = draw(st.one_of(st.tuples(st.integers(1, 48)), st.tuples(st.integers(1, 3), st.integers(1, 17))))
    dtype = draw(st.sampled_from(_supported(dtypes, supports.dtypes, "dtypes")))
    adapter_dtype = draw(st.sampled_from((dtype, torch.float32)))
    # The NF4Tensor contract casts W and the bias to x's dtype too: there each may come in another one (an fp32 bias
    # beside bf16 activations, a weight quantized from fp32). Another library's format keeps its own conventions.
    bias_dtype, weight_dtype = dtype, dtype
    if quantizer is NF4TENSOR_QUANTIZER:
        bias_dtype, weight_dtype = draw(st.sampled_from((dtype, torch.float32))), draw(st.sampled_from((dtype, torch.float32)))
    double_quant, with_bias = draw(st.sampled_from(supports.double_quant)), draw(st.booleans())
    scaling = draw(st.sampled_from((0.5, 2.0, 16 / 3, 64 / 8**0.5)))
    g = seeded_generator(draw(st.integers(0, 2**31 - 1)))
    weight = quantizer.quantize((torch.randn(N, K, generator=g) * 0.05).to(weight_dtype), blocksize, double_quant)
    x = torch.randn(*lead, K, generator=g).to(dtype)
    if draw(st.integers(0, 2)) == 0:  # an outlier activation: in bf16 past fp16's range, as in real LLM layers
        x = add_outliers(x, draw(st.integers(1, 3)), g)
    lora_A = (torch.randn(r, K, generator=g) / K**0.5).to(adapter_dtype)
    lora_B = (torch.randn(N, r, generator=g) * 0.1).to(adapter_dtype)
    bias = (torch.randn(N, generator=g) * 0.1).to(bias_dtype) if with_bias else None
    dense = quantizer.dequantize(weight).to(dtype).double().reshape(N, K)  # W in x's dtype, as the spec casts it
    return Problem(x, weight, lora_A, lora_B, scaling, bias, dense, blocksize, double_quant)


def float64_reference(p: Problem, x: torch.Tensor | None = None, lora_A=None, lora_B=None, bias=None) -> torch.Tensor:
    """y in float64 from the dequantized weight, with A, B and bias first cast to x's dtype (the contract)."""
    x = p.x if x is None else x
    lora_A = p.lora_A if lora_A is None else lora_A
    lora_B = p.lora_B if lora_B is None else lora_B
    bias = p.bias if bias is None else bias
    as64 = lambda t: t.to(p.x.dtype).double()  # noqa: E731
    y = as64(x) @ p.dense.t() + p.scaling * (as64(x) @ as64(lora_A).t()) @ as64(lora_B).t()
    return y if bias is None else y + as64(bias)


def magnitudes(p: Problem):
    """|x| @ |W|^T + s |x| @ |A|^T @ |B|^T + |bias|: what the rounding errors scale with."""
    ax, aw = p.x.double().abs(), p.dense.abs()
    aa, ab = p.lora_A.to(p.x.dtype).double().abs(), p.lora_B.to(p.x.dtype).double().abs()
    out = ax @ aw.t() + abs(p.scaling) * (ax @ aa.t()) @ ab.t()
    return out if p.bias is None else out + p.bias.double().abs()


def call_qlora(target, p: Problem, deterministic: bool = False) -> torch.Tensor:
    y = call_guarded(target.op("qlora_linear"), *p.args(), name="qlora_linear", deterministic=deterministic)
    if not isinstance(y, torch.Tensor):
        raise CheckFailed(f"qlora_linear must return a tensor, got {type(y).__name__}")
    expected_shape = (*p.x.shape[:-1], p.dense.shape[0])
    if tuple(y.shape) != expected_shape or y.dtype != p.x.dtype:
        raise CheckFailed(f"expected output of shape {expected_shape} and dtype {p.x.dtype}, got {tuple(y.shape)} {y.dtype}")
    return y


def describe_problem(p: Problem) -> str:
    return (
        f"x {tuple(p.x.shape)} {str(p.x.dtype).replace('torch.', '')}, N={p.dense.shape[0]}, r={p.lora_A.shape[0]}, "
        f"blocksize={p.blocksize}, double_quant={p.double_quant}, bias={p.bias is not None}, scaling={p.scaling:.4g}"
    )


@check(
    "qlora.forward_matches_float64",
    requires=("qlora_linear",),
    points=12,
    exercise="03",
    level=SEMANTIC,
    hint="Dequantize W to x's dtype, compute x @ W^T, add the bias, and add the adapter path through the small "
    "r-wide intermediate x @ A^T, multiplied by `scaling` (alpha/r). Cast A, B and bias to x's dtype first, "
    "and keep every leading dimension of x.",
)
def forward_matches_float64(target) -> None:
    """Output equals the float64 reference for drawn odd shapes, ranks, dtypes and scalings, on repeated calls, and M=327.

    Draws ``problems``: M = 1 to 48 rows or 3-D x, N = 1 to 96, r = 1 to 8 or 16/32/64, K whole NF4 blocks of 32 to
    256, three dtypes, outlier activations, double quantization, bias or not, W, A, B and bias in x's dtype or
    another; then one fixed case of M = 327 bf16 rows, past several 64-row tiles, beside an fp32 weight, A, B and
    bias. Tile edges and K not a multiple of the blocksize are drawn by ``bounds.qlora_linear`` and
    ``qlora.rejects_bad_input``.
    """

    @settings(max_examples=examples(15))
    @given(problems(quantizer=quantizer_for(target)), st.integers(0, 2**31 - 1))
    def prop(p, reseed):
        fresh = p.with_new_values(reseed)
        # The same shapes three times: new values, then the first call's own storage refilled (same prefix, new tail).
        for call, trial in (("first call", p), ("new values", fresh), ("refilled in place", p)):
            if call == "refilled in place":
                refill_tail([t for t in (p.x, p.lora_A, p.lora_B, p.bias) if t is not None], seeded_generator(reseed))
            check_forward(target, trial, call, deterministic=call == "first call")

    prop()
    tall = fixed_problem(TALL_M, 256, 96, 8, torch.bfloat16, seed=0, target=target, params_dtype=torch.float32)
    tall.x = add_outliers(tall.x, 3, seeded_generator(TALL_M))  # and bf16 activations past fp16's 65,504, every run
    check_forward(target, tall, "M past several 64-row tiles, bf16 outliers, fp32 weight, adapters and bias")


def check_forward(target, p: Problem, what: str, deterministic: bool = False) -> None:
    """The target's output equals the float64 reference within the bound derived from its dtype and K."""
    y = call_qlora(target, p, deterministic=deterministic)
    allowed = product_bound(magnitudes(p), p.K, p.x.dtype)
    assert_close(y, float64_reference(p), allowed, f"qlora_linear output ({describe_problem(p)}, {what})")


def fixed_problem(M: int, K: int, N: int, r: int, dtype: torch.dtype, seed: int, target=None,
                  params_dtype: torch.dtype | None = None) -> Problem:
    """One problem of a given size, not drawn: the tall case and the realistic ones (blocksize 64, double quant, bias).

    With ``target``, its weight is in the target's own format (``formats.quantizer_for``). ``params_dtype`` is the
    dtype of the weight (before quantization), the adapters and the bias for an NF4Tensor target: x's unless given.
    """
    g = seeded_generator(seed)
    quantizer = NF4TENSOR_QUANTIZER if target is None else quantizer_for(target)
    double_quant = True in quantizer.supports.double_quant
    params_dtype = params_dtype if quantizer is NF4TENSOR_QUANTIZER and params_dtype else dtype  # as in ``problems``
    weight = quantizer.quantize((torch.randn(N, K, generator=g) * 0.02).to(params_dtype), 64, double_quant)
    x = torch.randn(M, K, generator=g).to(dtype)
    lora_A = (torch.randn(r, K, generator=g) / K**0.5).to(params_dtype)
    lora_B = (torch.randn(N, r, generator=g) * 0.1).to(params_dtype)
    dense = quantizer.dequantize(weight).to(dtype).double().reshape(N, K)  # W in x's dtype, as the spec casts it
    bias = (torch.randn(N, generator=g) * 0.1).to(params_dtype)
    return Problem(x, weight, lora_A, lora_B, 2.0, bias, dense, 64, double_quant)


def _float64_gradients(p: Problem, grad_out: torch.Tensor):
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (p.x, p.lora_A, p.lora_B, p.bias)]
    x, lora_A, lora_B, bias = leaves
    y = x @ p.dense.t() + p.scaling * (x @ lora_A.t()) @ lora_B.t()
    if bias is not None:
        y = y + bias
    backward([y], [grad_out.double()])
    return [None if t is None else t.grad for t in leaves]


def gradient_bounds(p: Problem, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Elementwise error bounds for each gradient, from the magnitudes and lengths of the sums that form it.

    dX = dY·W + s·(dY·B)·A sums over N then r; dA = s·(dY·B)ᵀ·X over N then M;
    dB = s·dYᵀ·(X·Aᵀ) over K then M; d(bias) = Σ dY over M.
    """
    s = abs(p.scaling)
    g = grad_out.double().abs().reshape(-1, grad_out.shape[-1])
    ax = p.x.double().abs().reshape(-1, p.K)
    aw, aa, ab = p.dense.abs(), p.lora_A.double().abs(), p.lora_B.double().abs()
    N, r, M, K = grad_out.shape[-1], p.lora_A.shape[0], p.M, p.K
    terms = {
        "x": (g @ aw + s * (g @ ab) @ aa, N + r),
        "lora_A": (s * (g @ ab).t() @ ax, M + N),
        "lora_B": (s * g.t() @ (ax @ aa.t()), M + K),
        "bias": (g.sum(0), M),
    }
    return {name: product_bound(magnitude, n, p.x.dtype) for name, (magnitude, n) in terms.items()}


@check(
    "qlora.gradients_match_float64",
    requires=("qlora_linear",),
    points=12,
    exercise="03",
    level=SEMANTIC,
    hint="dX = dY·W + s·(dY·B)·A, dA = s·(dY·B)ᵀ·X, dB = s·dYᵀ·(X·Aᵀ), d(bias) = the sum of dY over every "
    "leading dimension. The frozen NF4 weight gets no gradient at all.",
)
def gradients_match_float64(target) -> None:
    """Gradients of x, A, B and bias equal float64 autograd of the formula (drawn shapes and M=327); the weight gets none."""
    quantizer = quantizer_for(target)
    if not quantizer.supports.backward:
        raise NotSupported(quantizer.supports.missing.get("backward", "the target declares no backward"))

    @settings(max_examples=examples(10))
    @given(problems(quantizer=quantizer))
    def prop(p):
        check_gradients(target, p)

    prop()
    check_gradients(target, fixed_problem(TALL_M, 256, 96, 8, torch.float32, seed=1, target=target),
                    "M past several 64-row tiles")
    check_gradients(target, fixed_problem(5, 128, 24, 4, torch.bfloat16, seed=2, target=target, params_dtype=torch.float32),
                    "fp32 weight, adapters and bias beside bf16 x")


def check_gradients(target, p: Problem, what: str = "drawn") -> None:
    """Gradients of x, A, B and bias from the target's backward equal float64 autograd, within derived bounds."""
    inputs = [None if t is None else t.detach().clone().requires_grad_() for t in (p.x, p.lora_A, p.lora_B, p.bias)]
    graded = p.with_tensors(*inputs)
    y = call_qlora(target, graded)
    if not y.requires_grad:
        raise CheckFailed("qlora_linear's output does not require grad although x, A and B do")
    grad_out = torch.randn(y.shape, generator=seeded_generator(p.M)).to(y.dtype)
    backward([y], [grad_out])
    expected = _float64_gradients(p, grad_out)
    bounds = gradient_bounds(p, grad_out)
    for name, tensor, want in zip(("x", "lora_A", "lora_B", "bias"), inputs, expected):
        if tensor is None:
            continue
        if tensor.grad is None:
            raise CheckFailed(f"{name} received no gradient ({describe_problem(p)}, {what})")
        assert_close(tensor.grad, want, bounds[name].reshape(tensor.shape), f"gradient of {name} ({describe_problem(p)}, {what})")
