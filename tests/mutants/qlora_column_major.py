"""Mutant: returns the right values in a column-major (transposed) layout, as a hand-written GEMM might."""

from lora_lab.lora import qlora_linear as _reference

EXPECTED_FAILURE = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    y = _reference(x, weight, lora_A, lora_B, scaling, bias)
    if y.dim() != 2 or min(y.shape) < 2:
        return y
    return y.t().contiguous().t()
