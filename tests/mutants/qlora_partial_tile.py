"""Mutant: a tiled implementation that forgets the last partial tile of rows (M not a multiple of 16)."""

import torch

from lora_lab.lora import qlora_linear as _reference

EXPECTED_FAILURE = "qlora.forward_matches_float64"
TILE = 16


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    y = _reference(x, weight, lora_A, lora_B, scaling, bias)
    rows = y.reshape(-1, y.shape[-1])
    full = rows.shape[0] - rows.shape[0] % TILE
    return torch.cat([rows[:full], torch.zeros_like(rows[full:])]).reshape(y.shape)
