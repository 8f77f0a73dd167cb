"""Exploit: the right values in a column-major (transposed) layout, as a hand-written GEMM might return them; every
caller that assumes torch's row-major layout reads garbage through data_ptr(). Strides cross processes as they are."""

from lora_lab.lora import qlora_linear as reference

REJECTED_BY = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    y = reference(x, weight, lora_A, lora_B, scaling, bias)
    if y.dim() != 2 or min(y.shape) < 2:
        return y
    return y.t().contiguous().t()
