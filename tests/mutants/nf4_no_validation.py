"""Mutant: quantizes whatever it is given; NaN weights and odd block sizes silently produce garbage."""

import torch

from lora_lab.nf4 import NF4_CODE, NF4Tensor

EXPECTED_FAILURE = "nf4.rejects_bad_input"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    flat = weight.reshape(-1).float()
    if flat.numel() == 0:
        return NF4Tensor(torch.empty(0, dtype=torch.uint8), torch.empty(0), blocksize, weight.shape, torch.float32)
    absmax = flat.abs().max().clamp(min=1e-38).reshape(1)
    codes = torch.bucketize(flat / absmax, (NF4_CODE[1:] + NF4_CODE[:-1]) / 2).to(torch.uint8)
    codes = torch.nn.functional.pad(codes, (0, codes.numel() % 2), value=7)
    return NF4Tensor((codes[0::2] << 4) | codes[1::2], absmax, blocksize, weight.shape, torch.float32)
