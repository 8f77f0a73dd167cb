"""Mutant: multiplies the short last block by the reciprocal too; bitsandbytes divides there (one ulp apart)."""

import torch

from lora_lab.nf4 import NF4Tensor, _nf4_absmax, _nf4_midpoints

EXPECTED_FAILURE = "nf4.bytes_match_bitsandbytes"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    flat = weight.reshape(-1).float()
    absmax = _nf4_absmax(flat, blocksize)
    reciprocal = (1.0 / absmax.clamp(min=1e-38)).repeat_interleave(blocksize)[: flat.numel()]
    normalized = (flat * reciprocal).clamp(-1, 1)
    normalized = torch.nn.functional.pad(normalized, (0, normalized.numel() % 2))
    codes = torch.bucketize(normalized, _nf4_midpoints()).to(torch.uint8)
    return NF4Tensor((codes[0::2] << 4) | codes[1::2], absmax, blocksize, weight.shape, weight.dtype)
