"""Mutant: a hand-written backward that forgets `scaling` in the adapter gradients dA and dB."""

import torch

from lora_lab.lora import base_path

EXPECTED_FAILURE = "qlora.gradients_match_float64"


class _LoraPath(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_A, lora_B, scaling):
        ctx.save_for_backward(x, lora_A, lora_B)
        ctx.scaling = scaling
        return (x @ lora_A.t()) @ lora_B.t() * scaling

    @staticmethod
    def backward(ctx, grad):
        x, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        grad_x = s * (grad @ lora_B) @ lora_A
        x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_A = (g2 @ lora_B).t() @ x2  # missing * s
        grad_B = g2.t() @ (x2 @ lora_A.t())  # missing * s
        return grad_x, grad_A, grad_B, None


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    return base_path(x, weight, bias) + _LoraPath.apply(x, lora_A.to(x.dtype), lora_B.to(x.dtype), scaling)
