"""The float64 re-check of ``lora-lab bench``: what each output must be, and whether an implementation's is.

Separate from the timing loop in ``benchmarking`` because it is the other half
of a trustworthy result: a fast answer counts only after it has been compared,
element by element, with float64 computed from the dequantized weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lora_lab.bench.cases import Case, Inputs
from lora_lab.conformance.judge.compare import product_bound
from lora_lab.nf4 import NF4Tensor, dequantize_nf4

Expected = dict[str, tuple[torch.Tensor, torch.Tensor]]  # output name -> (float64 value, elementwise error bound)


def float64_expected(case: Case, weight: NF4Tensor, inputs: Inputs, scaling: float) -> Expected:
    """y (and dX, dA, dB unless forward-only) in float64 from the dequantized weight, with bounds.

    The bounds are ``product_bound`` of each result's magnitude (the same sums
    with every term made positive) and of the length of the sums that form it,
    as in the conformance suite's gradient checks.
    """
    s = abs(scaling)
    x, A, B = (t.double() for t in (inputs.x, inputs.lora_A, inputs.lora_B))
    W = dequantize_nf4(weight).double()
    ax, aA, aB, aW = x.abs(), A.abs(), B.abs(), W.abs()
    out: Expected = {}
    y_bound = product_bound(ax @ aW.t() + s * (ax @ aA.t()) @ aB.t(), case.K, case.dtype)
    out["y"] = (x @ W.t() + scaling * (x @ A.t()) @ B.t(), y_bound)
    if case.op == "forward":
        return out
    dy = inputs.grad_y.double()
    ady = dy.abs()
    dy_b, ady_b = dy @ B, ady @ aB
    out["dX"] = (dy @ W + scaling * dy_b @ A, product_bound(ady @ aW + s * ady_b @ aA, case.N + case.r, case.dtype))
    out["dA"] = (scaling * dy_b.t() @ x, product_bound(s * ady_b.t() @ ax, case.M + case.N, case.dtype))
    out["dB"] = (scaling * dy.t() @ (x @ A.t()), product_bound(s * ady.t() @ (ax @ aA.t()), case.M + case.K, case.dtype))
    return out


@dataclass
class Verdict:
    correct: bool
    max_rel_err: float | None  # max |got - want| / max |want| over the outputs; None when an output is NaN/Inf
    err_vs_bound: float | None  # worst |got - want| / bound; <= 1 is correct
    message: str = ""


def judge(got: dict[str, torch.Tensor | None], expected: Expected) -> Verdict:
    """Compare each output with its float64 value, on the device (no copies of large tensors to the host)."""
    worst_rel, worst_ratio, problems = 0.0, 0.0, []
    for name, tensor in got.items():
        want, bound = expected[name]
        if tensor is None:
            return Verdict(False, None, None, f"{name} was not produced")
        if tuple(tensor.shape) != tuple(want.shape):
            return Verdict(False, None, None, f"{name} has shape {tuple(tensor.shape)}, expected {tuple(want.shape)}")
        if not bool(torch.isfinite(tensor).all()):
            return Verdict(False, None, None, f"{name} contains NaN or Inf")
        err = (tensor.double() - want).abs()
        worst_rel = max(worst_rel, float(err.max() / want.abs().max().clamp(min=1e-300)))
        ratio = float((err / bound).max())
        worst_ratio = max(worst_ratio, ratio)
        if ratio > 1:
            bad = int((err > bound).sum())
            problems.append(f"{name}: {bad} of {err.numel()} elements beyond tolerance (worst {ratio:.3g}x the bound)")
    return Verdict(not problems, worst_rel, worst_ratio, "; ".join(problems))


def poison_allocator(shapes: Sequence[tuple[tuple[int, ...], torch.dtype]], device: torch.device) -> None:
    """Fill memory the next allocations of these shapes will likely reuse with NaN (CUDA's caching allocator).

    An implementation that leaves part of its output unwritten then shows NaN
    instead of a stale, correct value from an earlier call. Best effort: the
    allocator decides which free block an allocation gets.
    """
    if device.type != "cuda":
        return
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device=device) for shape, dtype in shapes]
    del blocks
