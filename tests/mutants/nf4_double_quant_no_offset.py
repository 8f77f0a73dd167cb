"""Mutant: double quantization without subtracting the mean absmax first (offset stored as 0)."""

import torch

from lora_lab.nf4 import NF4Tensor, _dynamic_lookup
from lora_lab.nf4 import quantize_nf4 as _quantize

EXPECTED_FAILURE = "nf4.double_quant_offset"


def quantize_nf4(weight, blocksize=64, double_quant=False):
    q = _quantize(weight, blocksize, False)
    if not double_quant:
        return q
    code, nearest = _dynamic_lookup()
    absmax = q.absmax
    blocks = -(-absmax.numel() // 256)
    padded = torch.nn.functional.pad(absmax, (0, blocks * 256 - absmax.numel()))
    scales = padded.view(blocks, 256).amax(1)
    normalized = (padded.view(blocks, 256) / scales[:, None]).reshape(-1)[: absmax.numel()]
    codes = nearest[(((normalized + 1) * 0.5) * 65535 + 0.5).long().clamp(0, 65535)]
    return NF4Tensor(q.packed, codes, blocksize, q.shape, q.dtype, True, code, scales, 0.0)
