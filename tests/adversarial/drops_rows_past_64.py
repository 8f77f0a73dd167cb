"""Exploit: a tiled forward that drops the partial row tile past the first 64 rows (zeros there); the suite's inputs
never had more than 51 rows."""

from lora_lab.lora import qlora_linear as reference

REJECTED_BY = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    y = reference(x, weight, lora_A, lora_B, scaling, bias)
    rows = y.reshape(-1, y.shape[-1])
    full = rows.shape[0] // 64 * 64
    if rows.shape[0] > 64 and full < rows.shape[0]:
        rows = rows.clone()
        rows[full:] = 0
    return rows.reshape(y.shape)
