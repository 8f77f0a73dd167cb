"""Mutant: picks the NF4 level just below each value instead of the nearest one."""

import torch

from lora_lab.nf4 import NF4_CODE, NF4Tensor, _blockwise_absmax

EXPECTED_FAILURE = "nf4.bytes_match_bitsandbytes"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    flat = weight.reshape(-1).float()
    absmax = _blockwise_absmax(flat, blocksize)
    scale = absmax.clamp(min=1e-38).repeat_interleave(blocksize)[: flat.numel()]
    codes = (torch.bucketize(flat / scale, NF4_CODE, right=True) - 1).clamp(0, 15).to(torch.uint8)
    codes = torch.nn.functional.pad(codes, (0, codes.numel() % 2), value=7)
    return NF4Tensor((codes[0::2] << 4) | codes[1::2], absmax, blocksize, weight.shape, weight.dtype)
