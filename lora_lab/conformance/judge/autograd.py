"""Backward with given gradients, as both processes take it: the suite's properties and the target's model handle."""

from __future__ import annotations


def backward(outputs: list, grads: list) -> None:
    """``torch.autograd.backward(outputs, grads)``, taken as the gradient of sum(output * grad): the same gradients
    bit for bit, since each output's node receives 1 * grad, exactly grad. torch's own first backward with given
    gradients in a process imports sympy (0.5-0.8 s on 2 cores), once in the suite's and once in every target's."""
    total = 0
    for output, grad in zip(outputs, grads):
        if output.shape != grad.shape:
            raise RuntimeError(f"Mismatch in shape: a gradient of shape {tuple(grad.shape)} for an output of shape "
                               f"{tuple(output.shape)}")
        total = total + (output * grad.to(output.dtype)).sum()
    total.backward()

