"""Mutant: nearest level by argmin |x - level| in fp32; on a midpoint the rounded distances can pick the upper level."""

import torch

from lora_lab.nf4 import NF4_CODE, NF4Tensor, _nf4_absmax, _normalize_blocks

EXPECTED_FAILURE = "nf4.bytes_match_bitsandbytes"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    flat = weight.reshape(-1).float()
    absmax = _nf4_absmax(flat, blocksize)
    normalized = _normalize_blocks(flat, absmax, blocksize)
    normalized = torch.nn.functional.pad(normalized, (0, normalized.numel() % 2))
    codes = (normalized[:, None] - NF4_CODE[None, :]).abs().argmin(1).to(torch.uint8)
    return NF4Tensor((codes[0::2] << 4) | codes[1::2], absmax, blocksize, weight.shape, weight.dtype)
