"""Mutant: finds each element's block with float32 arithmetic, exact only below 2^24 elements; past that, elements
near a block's end are scaled by their neighbour block's absmax."""

import torch

from lora_lab.nf4 import NF4Tensor, _nf4_absmax, _nf4_midpoints, check_weight, quantize_absmax

EXPECTED_FAILURE = "nf4.quantize_realistic_size"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    check_weight(weight, blocksize)
    flat = weight.detach().reshape(-1).float()
    absmax = _nf4_absmax(flat, blocksize)
    block = (torch.arange(flat.numel(), dtype=torch.float32) / blocksize).floor().long().clamp(max=absmax.numel() - 1)
    normalized = (flat / absmax.clamp(min=1e-38)[block]).clamp(-1, 1)
    normalized = torch.nn.functional.pad(normalized, (0, normalized.numel() % 2))
    codes = torch.bucketize(normalized, _nf4_midpoints()).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4Tensor(packed, absmax, blocksize, weight.shape, weight.dtype)
    absmax_codes, absmax_code, scales, offset = quantize_absmax(absmax)
    return NF4Tensor(packed, absmax_codes, blocksize, weight.shape, weight.dtype, True, absmax_code, scales, offset)
