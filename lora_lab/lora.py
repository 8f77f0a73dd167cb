"""The QLoRA linear layer: a frozen NF4 weight plus a small trainable low-rank update.

A QLoRA layer computes

    y = x @ W^T + bias + scaling * (x @ A^T) @ B^T

where ``W`` (N x K) is the frozen base weight stored in NF4, and the adapters
``A`` (r x K) and ``B`` (N x r) are the only trainable tensors. With r much
smaller than K and N the update ``B @ A`` has rank r and costs r*(K+N)
parameters instead of N*K. ``scaling`` is alpha/r (or alpha/sqrt(r) with
rsLoRA) so that changing r does not change the size of the update.

``B`` starts at zero, so a fresh layer computes exactly the base model, and
training moves away from it gradually.

The base weight never gets a gradient: ``_FrozenNF4Linear`` dequantizes it on
the fly in the forward pass and again in the backward pass (for dX = dY @ W),
so no dense copy of W is kept alive between them. That is where QLoRA's
memory saving comes from.

QLoRA freezes *and quantizes* the whole base model: the linear layers without
adapters become ``NF4Linear`` (the same frozen NF4 path, no adapters), so only
``lm_head``, the embeddings and the norms stay dense.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lora_lab.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from lora_lab.operands import check_qlora_operands

BACKENDS = ("reference", "triton")
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _FrozenNF4Linear(torch.autograd.Function):
    """``x @ dequantize(W)^T + bias``, differentiable in x and bias only; W is re-dequantized in backward.

    Uses ``F.linear`` (one fused GEMM with the bias), exactly as bitsandbytes'
    ``Linear4bit`` does, so the reference and the real stack round identically.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight
        ctx.has_bias = bias is not None
        return F.linear(x, dequantize_nf4(weight).to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_out @ dequantize_nf4(ctx.weight).to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def base_path(x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The frozen part, ``x @ W^T + bias``, with W dequantized to x's dtype."""
    return _FrozenNF4Linear.apply(x, weight, None if bias is None else bias.to(x.dtype))


def lora_path(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The trainable part, ``scaling * (x @ A^T) @ B^T``: through r numbers, never an N x K matrix."""
    return (x @ lora_A.to(x.dtype).t()) @ lora_B.to(x.dtype).t() * scaling


def qlora_linear(
    x: torch.Tensor,
    weight: NF4Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ W^T + bias + scaling * (x @ A^T) @ B^T`` — the op every kernel must equal.

    Shapes: x (..., K), weight (N, K) in NF4, lora_A (r, K), lora_B (N, r),
    bias (N,). ``y`` has shape (..., N) and x's dtype; A, B and bias in another
    float dtype are cast to x's dtype first. Differentiable in x, A, B and
    bias, never in the weight.
    """
    check_qlora_operands(x, weight, lora_A, lora_B, bias, scaling)
    return base_path(x, weight, bias) + lora_path(x, lora_A, lora_B, scaling)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) with rank-stabilized LoRA (rsLoRA)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"expected the rank r to be a positive integer, got {r!r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _quantized(linear: nn.Linear, blocksize: int, double_quant: bool) -> NF4Tensor:
    """``linear``'s weight in NF4: the one way both layer types are made from an ``nn.Linear``."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
    return quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` stored in NF4: ``y = x @ W^T + bias``, with no adapters and nothing to train.

    QLoRA quantizes the *whole* base model, not only the layers that get
    adapters: bitsandbytes' ``load_in_4bit`` stores every linear layer but
    ``lm_head`` in NF4, and peft then adds adapters only where they are wanted.
    ``apply_qlora`` puts this layer on the linear layers it does not target
    (the MLP's gate/up/down_proj by default); otherwise their dense weights
    would stay in 16 or 32 bits, about 11 GB of bf16 for Llama 3.1 8B.

    The NF4 weight is a plain attribute, not a Parameter or buffer: optimizers
    and ``state_dict`` never see it. ``.to(device)`` moves it; dtype casts do not
    touch it (its storage format is fixed). ``QLoRALinear`` is this layer plus
    trainable adapters.
    """

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"expected compute_dtype to be one of {', '.join(map(str, COMPUTE_DTYPES))} or None, "
                             f"got {compute_dtype!r}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | None = None
    ) -> NF4Linear:
        """Quantize ``linear.weight`` to NF4 and freeze its bias."""
        return cls(_quantized(linear, blocksize, double_quant), linear.bias, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._in_compute_dtype(x, lambda x: base_path(x, self.weight, self.bias))

    def _in_compute_dtype(self, x: torch.Tensor, compute) -> torch.Tensor:
        """``compute(x)`` with x cast to ``compute_dtype`` (when set), and the result cast back to x's dtype.

        This is bitsandbytes' ``Linear4bit(compute_dtype=...)``: QLoRA stores the
        base in NF4 and computes in bf16 even when the surrounding model (norms,
        residual stream) is fp32. What backward keeps is the cast x, in bf16.
        """
        if self.compute_dtype is None or x.dtype == self.compute_dtype:
            return compute(x)
        return compute(x.to(self.compute_dtype)).to(x.dtype)

    def _apply(self, fn, recurse=True):
        # Follow device moves (``.to("cuda")``) with the NF4 weight; its dtype never changes.
        device = fn(torch.zeros((), device=self.weight.device)).device
        self.weight = self.weight.to(device)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        q = self.weight
        dtype = "" if self.compute_dtype is None else f", compute_dtype={str(self.compute_dtype).replace('torch.', '')}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"blocksize={q.blocksize}, double_quant={q.double_quant}{dtype}"
        )


class QLoRALinear(NF4Linear):
    """A drop-in replacement for ``nn.Linear``: frozen NF4 weight (as ``NF4Linear``), trainable ``lora_A``/``lora_B``."""

    def __init__(
        self,
        weight: NF4Tensor,
        bias: torch.Tensor | None,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        backend: str = "reference",
        adapter_dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"expected backend to be one of {BACKENDS}, got {backend!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"expected dropout in [0, 1), got {dropout!r}")
        super().__init__(weight, bias, compute_dtype)
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.r, self.alpha, self.use_rslora, self.backend = r, alpha, use_rslora, backend
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=adapter_dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=adapter_dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft (and nn.Linear) initialise A
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        blocksize: int = 64,
        double_quant: bool = True,
        backend: str = "reference",
        compute_dtype: torch.dtype | None = None,
    ) -> QLoRALinear:
        """Quantize ``linear.weight`` to NF4 and attach fresh adapters (A random, B zero, both fp32)."""
        return cls(_quantized(linear, blocksize, double_quant), linear.bias, r, alpha, dropout, use_rslora, backend,
                   compute_dtype=compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Both paths in ``compute_dtype`` (x's dtype when unset); the fp32 adapters are cast to it, never x up to them."""
        return self._in_compute_dtype(x, self._both_paths)

    def _both_paths(self, x: torch.Tensor) -> torch.Tensor:
        dropout_active = self.training and isinstance(self.lora_dropout, nn.Dropout)
        if dropout_active:
            # Dropout applies to the adapter's input only (as in peft), so the two paths see different x.
            check_qlora_operands(x, self.weight, self.lora_A, self.lora_B, self.bias, self.scaling)
            return base_path(x, self.weight, self.bias) + lora_path(
                self.lora_dropout(x), self.lora_A, self.lora_B, self.scaling
            )
        if self.backend == "triton":
            from lora_lab.kernels import fused_qlora_linear

            return fused_qlora_linear(x, self.weight, self.lora_A, self.lora_B, self.scaling, self.bias)
        return qlora_linear(x, self.weight, self.lora_A, self.lora_B, self.scaling, self.bias)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + scaling * B @ A`` in W's original dtype: the dense weight this layer is equivalent to."""
        base = dequantize_nf4(self.weight).float()
        return (base + self.scaling * (self.lora_B.float() @ self.lora_A.float())).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}, backend={self.backend!r}"
