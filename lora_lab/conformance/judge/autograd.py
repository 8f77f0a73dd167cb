"""Backward with given gradients, as both processes take it: the suite's properties and the target's model handle.

Autograd hands a backward whatever layout the gradient has: a slice of a wider tensor, a transposed one. A
hand-written backward that reads dY as if it were contiguous (a kernel given ``N, 1`` for dY's strides) reads the
wrong elements there, or past the end of dY. So the gradient of each backward taken here reaches the output's node in
one of three layouts (``LAYOUTS``), chosen by its shape (``layout_for``): a failing example replays with the same
layout, and the suite's process and the target's choose alike.
"""

from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "transposed", "strided")


def layout_for(shape) -> str:
    """The layout dY of this shape is handed in: each of ``LAYOUTS`` in turn as the sum of the sizes grows.

    A tensor of one element (a loss) is contiguous; a 1-D one is contiguous or strided (it has nothing to transpose).
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) == 0 or all(n <= 1 for n in shape):
        return "contiguous"
    if len(shape) == 1:
        return ("contiguous", "strided")[sum(shape) % 2]
    return LAYOUTS[sum(shape) % 3]


def laid_out(grad: torch.Tensor, layout: str) -> torch.Tensor:
    """``grad``'s values in ``layout``: ``contiguous``; ``transposed`` (the last dimension outermost in storage, so each
    row of dY is a column: strides ``(1, M)`` for an ``(M, N)`` dY); ``strided`` (every other element of a buffer twice as
    wide, whose gaps hold NaN: strides ``(2N, 2)``). The same values bit for bit, in a storage of their own."""
    if layout == "contiguous":
        return grad.clone(memory_format=torch.contiguous_format)
    if layout == "transposed":
        storage = torch.empty((grad.shape[-1], *grad.shape[:-1]), dtype=grad.dtype, device=grad.device)
        return storage.movedim(0, -1).copy_(grad)
    if layout == "strided":
        fill = float("nan") if grad.is_floating_point() or grad.is_complex() else 0
        wide = torch.full((*grad.shape[:-1], 2 * grad.shape[-1]), fill, dtype=grad.dtype, device=grad.device)
        return wide[..., ::2].copy_(grad)
    raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def describe_layout(shape) -> str:
    """How dY of this shape was laid out, for a failure's detail."""
    layout = layout_for(shape)
    return {"contiguous": "contiguous", "transposed": "transposed in memory (the last dimension's stride is not 1)",
            "strided": "a strided view (every other element of a wider buffer)"}[layout]


class _GivenGradient(torch.autograd.Function):
    """A scalar seed whose backward hands the given gradient, the very tensor, to ``output``'s node: its layout reaches
    the target's backward as it was made (a product with it, ``(output * grad).sum()``, would lay it out anew)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.grad = grad
        return output.new_zeros(())

    @staticmethod
    def backward(ctx, one: torch.Tensor):  # one is exactly 1: the seed's own gradient, through a plain sum
        return ctx.grad, None


def backward(outputs: list, grads: list) -> None:
    """``torch.autograd.backward(outputs, grads)``, each gradient in the layout ``layout_for`` its shape picks: the same
    gradients bit for bit. Through one seed per output and a plain sum rather than torch's own backward with given
    gradients, whose first use in a process imports sympy (0.5-0.8 s on 2 cores), once in the suite's and once in
    every target's."""
    total = None
    for output, grad in zip(outputs, grads):
        if output.shape != grad.shape:
            raise RuntimeError(f"Mismatch in shape: a gradient of shape {tuple(grad.shape)} for an output of shape "
                               f"{tuple(output.shape)}")
        given = laid_out(grad.detach().to(output.dtype), layout_for(grad.shape))
        seed = _GivenGradient.apply(output, given)
        total = seed if total is None else total + seed
    if total is not None:
        total.backward()
