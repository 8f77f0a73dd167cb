"""Mutant: a library format that keeps its 16 levels in bf16 whatever the weight's dtype, and dequantizes with them.

Each round trip is consistent with itself and within a hair of NF4's half-gap bound; the format's own numbers show
it plainly: for an fp32 weight its levels are off NF4's by up to 2e-3, far more than one fp32 rounding.
"""

import torch

from lora_lab.nf4 import NF4_CODE, NF4Tensor
from lora_lab.nf4 import quantize_nf4 as reference_quantize

EXPECTED_FAILURE = "nf4.format_codes_and_levels"
LEVELS = NF4_CODE.bfloat16()


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    return reference_quantize(weight, blocksize, double_quant)


def dequantize_nf4(q: NF4Tensor) -> torch.Tensor:
    absmax = q.absmax_fp32().repeat_interleave(q.blocksize)[: q.numel]
    return (LEVELS.float()[NF4_FORMAT.codes(q)] * absmax).to(q.dtype).reshape(q.shape)


class Bf16LevelsFormat:
    name = "NF4Tensor with bf16 levels"
    quantize = staticmethod(quantize_nf4)
    dequantize = staticmethod(dequantize_nf4)

    @staticmethod
    def codes(q: NF4Tensor) -> torch.Tensor:
        flat = q.packed.reshape(-1).to(torch.int64)
        return torch.stack((flat >> 4, flat & 15), dim=1).reshape(-1)[: q.numel]

    @staticmethod
    def levels(q: NF4Tensor) -> torch.Tensor:
        return LEVELS

    @staticmethod
    def absmax(q: NF4Tensor) -> torch.Tensor:
        return q.absmax_fp32()


NF4_FORMAT = Bf16LevelsFormat()
