"""Mutant: saves the dequantized weight for backward instead of dequantizing it again (bitsandbytes did, until 2024).

The numbers are right; a dense N x K weight stays alive between forward and backward for every layer.
"""

import torch
import torch.nn.functional as F

from lora_lab.lora import lora_path
from lora_lab.nf4 import dequantize_nf4

EXPECTED_FAILURE = "memory.qlora_linear_keeps_no_dense_weight"


class _KeepsDenseWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        dense = dequantize_nf4(weight).to(x.dtype)
        ctx.save_for_backward(dense)  # "saves dequantizing it twice"
        ctx.has_bias = bias is not None
        return F.linear(x, dense, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (dense,) = ctx.saved_tensors
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_out @ dense, None, grad_bias


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    base = _KeepsDenseWeight.apply(x, weight, None if bias is None else bias.to(x.dtype))
    return base + lora_path(x, lora_A, lora_B, scaling)
