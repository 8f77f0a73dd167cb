"""Mutant: the fused dX kernel launched without LoRA's scaling, so dX = dY·W + (dY·B)·A instead of + s·(dY·B)·A."""

import torch
from lora_lab.kernels.qlora_backward import qlora_grad_input
from lora_lab.kernels.qlora_forward import qlora_forward

EXPECTED_FAILURE = "qlora.gradients_match_float64"


class _Unscaled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, scaling, bias):
        x2d = x.reshape(-1, x.shape[-1])
        a, b = lora_A.to(x.dtype).contiguous(), lora_B.to(x.dtype).contiguous()
        y, xa = qlora_forward(x2d, weight, a, b, scaling, None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(x2d, xa, a, b)
        ctx.weight, ctx.scaling, ctx.x_shape = weight, scaling, x.shape
        ctx.dtypes = (lora_A.dtype, lora_B.dtype, None if bias is None else bias.dtype)
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        x2d, xa, a, b = ctx.saved_tensors
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x, dyb = qlora_grad_input(dy, ctx.weight, a, b, 1.0)  # the bug: scaling left out of the kernel's LoRA term
        grad_A = (dyb.t() @ x2d * ctx.scaling).to(ctx.dtypes[0])
        grad_B = (dy.t() @ xa * ctx.scaling).to(ctx.dtypes[1])
        grad_bias = None if ctx.dtypes[2] is None else dy.sum(0, dtype=torch.float32).to(ctx.dtypes[2])
        return grad_x.reshape(ctx.x_shape), None, grad_A, grad_B, None, grad_bias


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    return _Unscaled.apply(x, weight, lora_A, lora_B, float(scaling), bias)
