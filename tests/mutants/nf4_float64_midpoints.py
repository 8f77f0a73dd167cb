"""Mutant: compares with the midpoints between NF4 levels computed in float64, not fp32 as bitsandbytes does."""

import torch

from lora_lab.nf4 import NF4_CODE, NF4Tensor, _nf4_absmax, _normalize_blocks

EXPECTED_FAILURE = "nf4.bytes_match_bitsandbytes"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    flat = weight.reshape(-1).float()
    absmax = _nf4_absmax(flat, blocksize)
    normalized = _normalize_blocks(flat, absmax, blocksize).double()
    normalized = torch.nn.functional.pad(normalized, (0, normalized.numel() % 2))
    midpoints = (NF4_CODE[:-1].double() + NF4_CODE[1:].double()) / 2
    codes = torch.bucketize(normalized, midpoints).to(torch.uint8)
    return NF4Tensor((codes[0::2] << 4) | codes[1::2], absmax, blocksize, weight.shape, weight.dtype)
