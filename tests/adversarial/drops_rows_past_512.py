"""Exploit: a tiled forward whose row loop stops after 512 rows (zeros past them), right on every input of the drawn
checks (51 rows at most) and on their tall case of 327; a prefill of more than 2,048 rows shows it."""

from lora_lab.lora import qlora_linear as reference

REJECTED_BY = "qlora.llama_shapes"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    y = reference(x, weight, lora_A, lora_B, scaling, bias)
    rows = y.reshape(-1, y.shape[-1])
    if rows.shape[0] > 512:
        rows = rows.clone()
        rows[512:] = 0
    return rows.reshape(y.shape)
