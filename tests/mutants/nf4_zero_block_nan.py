"""Mutant: divides by the block absmax without guarding all-zero blocks, so they dequantize to NaN."""

import torch

from lora_lab.nf4 import NF4_CODE, NF4Tensor, _blockwise_absmax, dequantize_nf4  # noqa: F401

EXPECTED_FAILURE = "nf4.zero_blocks_and_round_trip"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    flat = weight.reshape(-1).float()
    absmax = _blockwise_absmax(flat, blocksize)
    normalized = flat / absmax.repeat_interleave(blocksize)[: flat.numel()]  # 0/0 = NaN in a zero block
    midpoints = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
    codes = torch.bucketize(normalized, midpoints).to(torch.uint8)
    codes = torch.nn.functional.pad(codes, (0, codes.numel() % 2), value=7)
    nan_absmax = torch.where(absmax == 0, torch.nan, absmax)
    return NF4Tensor((codes[0::2] << 4) | codes[1::2], nan_absmax, blocksize, weight.shape, weight.dtype)
