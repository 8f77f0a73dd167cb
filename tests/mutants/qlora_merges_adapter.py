"""Mutant: merges the adapter into the weight, x @ (W + s * B @ A)^T: right numbers, but B @ A is an N x K matrix.

autograd keeps the merged N x K weight for backward (it needs it for dX), the memory LoRA's r-wide path avoids.
"""

from lora_lab.nf4 import dequantize_nf4

EXPECTED_FAILURE = "memory.qlora_linear_keeps_no_dense_weight"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    merged = dequantize_nf4(weight).to(x.dtype) + scaling * (lora_B.to(x.dtype) @ lora_A.to(x.dtype))
    y = x @ merged.t()
    return y if bias is None else y + bias.to(x.dtype)
