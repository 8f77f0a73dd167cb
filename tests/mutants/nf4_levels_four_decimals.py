"""Mutant: the NF4 table typed in to four decimals (as torchao keeps it), used to quantize and to dequantize.

Every byte but the ones near a level midpoint still matches, and each round trip is consistent with itself; only
the values are off NF4's by up to 5e-5 of the absmax, which fp32 resolves.
"""

import torch

from lora_lab.nf4 import NF4_CODE, NF4Tensor, dequantize_nf4, quantize_nf4  # noqa: F401  (the reference bytes)

EXPECTED_FAILURE = "nf4.round_trip_is_nearest_level"
FOUR_DECIMALS = torch.round(NF4_CODE * 1e4) / 1e4


def dequantize_nf4(q: NF4Tensor) -> torch.Tensor:  # noqa: F811
    flat = q.packed.reshape(-1).to(torch.int64)
    codes = torch.stack((flat >> 4, flat & 15), dim=1).reshape(-1)[: q.numel]
    absmax = q.absmax_fp32().repeat_interleave(q.blocksize)[: q.numel]
    return (FOUR_DECIMALS[codes] * absmax).to(q.dtype).reshape(q.shape)
