"""Mutant: processes x in row tiles of 256 and drops the last partial tile once there is more than one."""

import torch

from lora_lab.lora import qlora_linear as _reference

EXPECTED_FAILURE = "qlora.forward_matches_float64"
TILE = 256


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    rows = x.reshape(-1, x.shape[-1])
    kept = rows.shape[0] if rows.shape[0] <= TILE else rows.shape[0] // TILE * TILE
    y = _reference(rows[:kept], weight, lora_A, lora_B, scaling, bias)
    out = torch.cat([y, y.new_zeros(rows.shape[0] - kept, y.shape[-1])])
    return out.reshape(*x.shape[:-1], -1)
