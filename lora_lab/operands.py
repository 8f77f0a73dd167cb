"""The shape and type rules of ``qlora_linear``, shared by the reference, the kernels and the adapters.

One function, so that every implementation in lora_lab refuses the same bad
input with the same words. It depends only on ``nf4`` (the kernels may import
nothing else from the reference).
"""

from __future__ import annotations

import numbers

import torch

from lora_lab.nf4 import NF4Tensor


def check_qlora_operands(x, weight, lora_A, lora_B, bias, scaling=1.0) -> None:
    """Raise TypeError/ValueError naming what was expected unless x (..., K), W (N, K), A (r, K), B (N, r), bias (N,) fit."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"expected x to be a floating-point tensor, got {got}")
    if not isinstance(weight, NF4Tensor):
        raise TypeError(f"expected weight to be an NF4Tensor (see lora_lab.nf4.quantize_nf4), got {type(weight).__name__}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point()):
            raise TypeError(f"expected {name} to be a floating-point tensor")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"expected scaling to be a Python number (alpha / r), got {type(scaling).__name__}; pass float(scaling)")
    if len(weight.shape) != 2:
        raise ValueError(f"expected a 2-D weight of shape (N, K), got shape {tuple(weight.shape)}")
    n_out, k_in = weight.shape
    if x.dim() < 1 or x.shape[-1] != k_in:
        raise ValueError(f"expected x of shape (..., {k_in}) to match weight (N={n_out}, K={k_in}), got {tuple(x.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != k_in or lora_A.shape[0] < 1:
        raise ValueError(f"expected lora_A of shape (r, {k_in}) with r >= 1, got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (n_out, r):
        raise ValueError(f"expected lora_B of shape ({n_out}, {r}) for N={n_out} and r={r}, got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"expected bias of shape ({n_out},), got {tuple(bias.shape)}")
