"""Mutant: repairs x * (1 / absmax) with nan_to_num instead of flooring absmax at 1e-38: a subnormal absmax gives +-1."""

import torch

from lora_lab.nf4 import NF4_CODE, NF4Tensor, _nf4_absmax, check_weight, quantize_absmax

EXPECTED_FAILURE = "nf4.bytes_match_bitsandbytes"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    check_weight(weight, blocksize)
    flat = weight.reshape(-1).float()
    absmax = _nf4_absmax(flat, blocksize)
    n = flat.numel()
    full = n - n % blocksize
    normalized = (flat[:full].view(-1, blocksize) * (1.0 / absmax[: full // blocksize, None])).reshape(-1)
    if full < n:
        normalized = torch.cat([normalized, flat[full:] / absmax[-1]])
    normalized = torch.nan_to_num(normalized).clamp(-1, 1)  # 0 * inf in a zero block is NaN: made 0 here
    normalized = torch.nn.functional.pad(normalized, (0, n % 2))
    codes = torch.bucketize(normalized, (NF4_CODE[:-1] + NF4_CODE[1:]) / 2).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4Tensor(packed, absmax, blocksize, weight.shape, weight.dtype)
    codes, code, scales, offset = quantize_absmax(absmax)
    return NF4Tensor(packed, codes, blocksize, weight.shape, weight.dtype, True, code, scales, offset)
