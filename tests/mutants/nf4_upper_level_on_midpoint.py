"""Mutant: an exact midpoint between two NF4 levels takes the upper level (bucketize right=True); bitsandbytes takes the lower."""

import torch

from lora_lab.nf4 import NF4Tensor, _nf4_absmax, _nf4_midpoints, _normalize_blocks

EXPECTED_FAILURE = "nf4.bytes_match_bitsandbytes"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    flat = weight.reshape(-1).float()
    absmax = _nf4_absmax(flat, blocksize)
    normalized = _normalize_blocks(flat, absmax, blocksize)
    normalized = torch.nn.functional.pad(normalized, (0, normalized.numel() % 2))
    codes = torch.bucketize(normalized, _nf4_midpoints(), right=True).to(torch.uint8)
    return NF4Tensor((codes[0::2] << 4) | codes[1::2], absmax, blocksize, weight.shape, weight.dtype)
