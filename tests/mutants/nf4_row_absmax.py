"""Mutant: one absmax per row instead of per block of `blocksize` flattened elements."""

import torch

from lora_lab.nf4 import NF4_CODE, NF4Tensor

EXPECTED_FAILURE = "nf4.bytes_match_bitsandbytes"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    rows = weight.reshape(weight.shape[0] if weight.dim() > 1 else 1, -1).float()
    absmax = rows.abs().amax(1, keepdim=True).clamp(min=1e-38)
    midpoints = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
    codes = torch.bucketize((rows / absmax).reshape(-1), midpoints).to(torch.uint8)
    codes = torch.nn.functional.pad(codes, (0, codes.numel() % 2), value=7)
    blocks = -(-weight.numel() // blocksize)
    per_block = absmax.repeat_interleave(rows.shape[1]).reshape(-1)[::blocksize][:blocks]
    return NF4Tensor((codes[0::2] << 4) | codes[1::2], per_block, blocksize, weight.shape, weight.dtype)
