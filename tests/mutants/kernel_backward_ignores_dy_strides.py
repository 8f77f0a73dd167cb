"""Mutant: the fused backward reads dY as if it were contiguous (row stride N, column stride 1), as a backward that
hands its kernel ``dy_ptr`` without ``dy.stride(0), dy.stride(1)`` does: right for a contiguous dY, the wrong elements
(a strided dY's gaps, a transposed dY's columns) for the dY autograd may hand a backward."""

import torch
from lora_lab.kernels.fused_qlora_linear import FusedQLoRALinear, _check_operands

EXPECTED_FAILURE = "qlora.gradients_match_float64"


class _IgnoresStrides(FusedQLoRALinear):
    @staticmethod
    def backward(ctx, grad_y):
        as_if_contiguous = grad_y.as_strided(grad_y.shape, torch.empty(grad_y.shape).stride())  # the bug
        return FusedQLoRALinear.backward(ctx, as_if_contiguous)


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    _check_operands(x, weight, lora_A, lora_B, scaling, bias)
    return _IgnoresStrides.apply(x, weight, lora_A, lora_B, float(scaling), bias)
