"""The QLoRA linear layer implementations ``lora-lab bench`` compares, and whether each can run here.

Each is an ``Impl`` whose setup turns a frozen NF4 weight into something that
runs one call; kept out of the command (``lora_lab.bench``) so that adding or
changing a contender touches only this registry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lora_lab.bench.cases import Bound, Impl
from lora_lab.nf4 import NF4Tensor, dequantize_nf4


class _DequantMatmulLoRA(torch.autograd.Function):
    """Unsloth's matmul_lora: W = dequantize() to a temporary, then cuBLAS, with the adapter path added by addmm."""

    @staticmethod
    def forward(ctx, x, dense_weight, lora_A, lora_B, scaling):
        x2d = x.reshape(-1, x.shape[-1])
        y = x2d @ dense_weight().t()
        xa = x2d @ lora_A.t()
        y.addmm_(xa, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x2d, xa, lora_A, lora_B)
        ctx.dense_weight, ctx.scaling, ctx.x_shape = dense_weight, scaling, x.shape
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        x2d, xa, lora_A, lora_B = ctx.saved_tensors
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        dy_b = dy @ lora_B
        grad_x = (dy @ ctx.dense_weight()).addmm_(dy_b, lora_A, alpha=ctx.scaling)  # W dequantized again
        grad_A = (dy_b.t() @ x2d).mul_(ctx.scaling)
        grad_B = (dy.t() @ xa).mul_(ctx.scaling)
        return grad_x.reshape(ctx.x_shape), None, grad_A, grad_B, None


def _functional(op):
    def setup(weight: NF4Tensor, scaling: float, dtype: torch.dtype):
        return (lambda A, B: Bound(lambda x: op(x, weight, A, B, scaling), A, B)), weight.nbytes

    return setup


def fast_dequantizer(weight: NF4Tensor) -> tuple[str, Callable[[], torch.Tensor]]:
    """The fastest dequantizer at hand: bitsandbytes' CUDA kernel (as Unsloth uses), else ours."""
    if weight.device.type == "cuda":
        try:
            import bitsandbytes.functional as bnb_functional

            packed, state = weight.to_bnb()
            return "bitsandbytes dequantize_4bit", lambda: bnb_functional.dequantize_4bit(packed, state)
        except Exception:  # noqa: BLE001 - fall back to the next-fastest
            try:
                from lora_lab.kernels import nf4_dequantize

                return "lora_lab.kernels.nf4_dequantize", lambda: nf4_dequantize(weight)
            except Exception:  # noqa: BLE001
                pass
    return "lora_lab.nf4.dequantize_nf4", lambda: dequantize_nf4(weight)


def _setup_dequant_cublas(weight: NF4Tensor, scaling: float, dtype: torch.dtype):
    _, dequantize = fast_dequantizer(weight)
    dense = lambda: dequantize().to(dtype)  # noqa: E731
    return (lambda A, B: Bound(lambda x: _DequantMatmulLoRA.apply(x, dense, A, B, scaling), A, B)), weight.nbytes


def _setup_dense(weight: NF4Tensor, scaling: float, dtype: torch.dtype):
    resident = dequantize_nf4(weight).to(dtype)
    return (lambda A, B: Bound(lambda x: _DequantMatmulLoRA.apply(x, lambda: resident, A, B, scaling), A, B)), (
        resident.numel() * resident.element_size()
    )


def _setup_bnb_peft(weight: NF4Tensor, scaling: float, dtype: torch.dtype):
    """One peft layer per case; each trial copies its adapters in (untimed) and clears their gradients."""
    import peft

    from lora_lab.conformance.judge.oracles import bnb_linear4bit

    holder = nn.Module()
    holder.proj = bnb_linear4bit(weight, None, compute_dtype=dtype)
    layer = None

    def bind(A: torch.Tensor, B: torch.Tensor) -> Bound:
        nonlocal layer
        if layer is None:
            config = peft.LoraConfig(r=A.shape[0], lora_alpha=scaling * A.shape[0], target_modules=["proj"], lora_dropout=0.0)
            layer = peft.get_peft_model(holder, config).base_model.model.proj
            layer.lora_A.to(device=A.device, dtype=dtype)
            layer.lora_B.to(device=A.device, dtype=dtype)
            layer.scaling["default"] = scaling
            layer.train()
        pA, pB = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            pA.copy_(A)
            pB.copy_(B)
        pA.grad = pB.grad = None
        return Bound(layer, pA, pB)

    return bind, weight.nbytes


def _fused(x, weight, A, B, scaling):
    from lora_lab.kernels import fused_qlora_linear

    return fused_qlora_linear(x, weight, A, B, scaling)


def _reference(x, weight, A, B, scaling):
    from lora_lab.lora import qlora_linear

    return qlora_linear(x, weight, A, B, scaling)


IMPLS = {
    "fused": Impl("fused", "lora_lab.kernels.fused_qlora_linear (Triton, NF4 decoded in the matmul)", _functional(_fused)),
    "dequant+cublas": Impl("dequant+cublas", "dequantize to a temporary, then torch matmuls", _setup_dequant_cublas),
    "bnb+peft": Impl("bnb+peft", "peft LoRA on a bitsandbytes Linear4bit", _setup_bnb_peft),
    "dense": Impl("dense", "weight already dequantized to x's dtype (the ideal; 4x the weight memory)", _setup_dense),
    "reference": Impl("reference", "lora_lab.lora.qlora_linear", _functional(_reference)),
}


def unavailable(name: str, device: torch.device) -> str:
    """Why an implementation cannot run here, or "" when it can."""
    try:
        if name == "bnb+peft":
            import bitsandbytes  # noqa: F401
            import peft  # noqa: F401
        if name == "fused":
            import lora_lab.kernels as kernels

            if device.type == "cpu" and kernels.INTERPRETING:
                return ""  # explicitly requested on the CPU: runs under Triton's interpreter, slowly
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return ""
