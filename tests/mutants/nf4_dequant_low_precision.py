"""Mutant: multiplies level x absmax in the weight's own dtype instead of fp32 (double rounding in fp16/bf16)."""

from lora_lab.nf4 import NF4_CODE, unpack_codes

EXPECTED_FAILURE = "nf4.dequantize_matches_bitsandbytes"


def dequantize_nf4(q):
    levels = NF4_CODE[unpack_codes(q.packed, q.numel).long()].to(q.dtype)
    scales = q.absmax_fp32().repeat_interleave(q.blocksize)[: q.numel].to(q.dtype)
    return (levels * scales).reshape(q.shape)
