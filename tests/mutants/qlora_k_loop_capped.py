"""Mutant: a blocked matmul whose K loop runs at most 16 blocks of 128 (K <= 2048), fine for every drawn size."""

import torch

from lora_lab.nf4 import dequantize_nf4

EXPECTED_FAILURE = "qlora.llama_shapes"
BLOCK_K, MAX_BLOCKS = 128, 16


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    w = dequantize_nf4(weight).to(x.dtype)
    y = torch.zeros(*x.shape[:-1], w.shape[0], dtype=torch.float32)
    for k in range(0, min(x.shape[-1], BLOCK_K * MAX_BLOCKS), BLOCK_K):
        y = y + (x[..., k:k + BLOCK_K].float() @ w[:, k:k + BLOCK_K].float().t())
    y = y.to(x.dtype) + scaling * (x @ lora_A.to(x.dtype).t()) @ lora_B.to(x.dtype).t()
    return y if bias is None else y + bias.to(x.dtype)
