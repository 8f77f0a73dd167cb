"""The gradients the suite hands a backward come in the layouts autograd may give (judge/autograd.py, #26 item 2).

A hand-written backward receives dY contiguous, transposed in memory, or as every other element of a wider buffer,
by dY's shape (the output's own node gets it; an op after it lays out its own gradient anew); the values are the
given ones bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from lora_lab.conformance.judge.autograd import LAYOUTS, backward, laid_out, layout_for


class _Seen(torch.autograd.Function):
    """The identity, recording the gradient its backward receives."""

    received: list[torch.Tensor] = []

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _Seen.received.append(grad)
        return grad


@pytest.mark.parametrize("shape", [(4, 6), (5, 6), (6, 6), (2, 3, 5), (7,), (1, 1)])
def test_a_hand_written_backward_gets_the_layout_its_shape_picks_and_the_same_values(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x, grad = torch.randn(shape, generator=g, requires_grad=True), torch.randn(shape, generator=g)
    _Seen.received.clear()
    backward([_Seen.apply(x)], [grad])
    received = _Seen.received[0]
    layout = layout_for(shape)
    assert torch.equal(received, grad) and torch.equal(x.grad, grad)
    assert received.is_contiguous() == (layout == "contiguous" or received.numel() <= 1), (layout, received.stride())
    if layout == "strided":
        assert received.stride(-1) == 2


def test_every_layout_is_drawn_for_two_dimensional_gradients():
    assert {layout_for((m, 8)) for m in range(1, 7)} == set(LAYOUTS)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_laid_out_keeps_the_values_in_a_storage_of_its_own(layout):
    grad = torch.arange(12.0).reshape(3, 4)
    copy = laid_out(grad, layout)
    assert torch.equal(copy, grad) and copy.untyped_storage().data_ptr() != grad.untyped_storage().data_ptr()
