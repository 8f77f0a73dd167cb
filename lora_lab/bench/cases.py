"""What ``lora-lab bench`` measures: a layer case, its seeded inputs, and the shape of an implementation.

The vocabulary shared by the timing loop (``benchmarking``), the float64
re-check (``bench_correctness``) and the implementations (``bench_impls``), kept
apart so that each of those can import it without importing the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lora_lab.nf4 import NF4Tensor

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


@dataclass(frozen=True)
class Case:
    """One QLoRA linear layer call: x (M, K) through W (N, K) in NF4 with rank-r adapters."""

    op: str  # "forward", "backward" (dX, dA, dB from a given dY) or "step" (both)
    M: int  # tokens (rows of x)
    N: int  # out_features
    K: int  # in_features
    r: int  # LoRA rank
    dtype: torch.dtype  # of x, y, the adapters and the dense weight

    def __str__(self) -> str:
        return f"{self.op} M={self.M} {self.K}->{self.N} r={self.r} {dtype_name(self.dtype)}"

    def flops(self) -> int:
        """Multiply-adds x2 of the least work: the base matmul plus the rank-r path (x @ A^T is saved, not redone).

        forward:  x W^T (2MNK), x A^T (2MKr), (xA^T) B^T (2MrN)
        backward: dY W (2MNK), dY B (2MNr), (dY B) A (2MrK), dA = (dY B)^T x (2MrK), dB = dY^T (x A^T) (2MNr)
        """
        M, N, K, r = self.M, self.N, self.K, self.r
        forward = 2 * M * N * K + 2 * M * r * (K + N)
        backward = 2 * M * N * K + 4 * M * r * (K + N)
        return {"forward": forward, "backward": backward, "step": forward + backward}[self.op]

    def min_bytes(self, weight_bytes: int) -> int:
        """Bytes that must cross memory at least once: the NF4 weight (codes + absmax) and every input and output.

        forward reads x, W, A, B and writes y; backward reads dY, x, W, A, B and
        writes dX, dA, dB; a step does both but reads x, W, A and B only once.
        """
        e = torch.finfo(self.dtype).bits // 8
        M, N, K, r = self.M, self.N, self.K, self.r
        x, y, adapters = M * K * e, M * N * e, r * (K + N) * e
        forward = weight_bytes + x + adapters + y
        backward = weight_bytes + y + x + adapters + x + adapters  # dY, x, A, B in; dX, dA, dB out
        step = weight_bytes + x + adapters + y + y + x + adapters  # x, W, A, B, dY in; y, dX, dA, dB out
        return {"forward": forward, "backward": backward, "step": step}[self.op]



# ----------------------------------------------------------------------------- inputs and implementations


@dataclass
class Inputs:
    """One seeded draw of everything a call reads besides the frozen weight."""

    x: torch.Tensor  # (M, K)
    lora_A: torch.Tensor  # (r, K)
    lora_B: torch.Tensor  # (N, r)
    grad_y: torch.Tensor  # (M, N), the upstream gradient for backward and step


def draw_inputs(case: Case, seed: int, device: torch.device) -> Inputs:
    """Activations ~ N(0, 1); A scaled so x @ A^T ~ N(0, 1); B non-zero so the adapter path counts."""
    g = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device)  # noqa: E731
    return Inputs(
        x=randn(case.M, case.K).to(case.dtype),
        lora_A=(randn(case.r, case.K) / math.sqrt(case.K)).to(case.dtype),
        lora_B=(randn(case.N, case.r) * 0.05).to(case.dtype),
        grad_y=randn(case.M, case.N).to(case.dtype),
    )


@dataclass
class Bound:
    """An implementation ready to run on one input set: ``forward(x)`` and the leaves that receive dA and dB."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    lora_A: torch.Tensor
    lora_B: torch.Tensor


# setup(weight, scaling, dtype) -> (bind(lora_A, lora_B) -> Bound, resident bytes of the weight it keeps)
Setup = Callable[[NF4Tensor, float, torch.dtype], tuple[Callable[[torch.Tensor, torch.Tensor], Bound], int]]


@dataclass(frozen=True)
class Impl:
    name: str
    description: str
    setup: Setup
