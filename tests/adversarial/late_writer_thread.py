"""Exploit: return the right output, then change it from a background thread a moment later (a lazy or late write).
The output is copied on return, and the target's process checks the previous outputs again around the next call."""

import threading
import time

from lora_lab.lora import qlora_linear as reference

REJECTED_BY = "qlora.forward_matches_float64"


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    y = reference(x, weight, lora_A, lora_B, scaling, bias)

    def spoil():
        time.sleep(0.001)
        y.data.add_(1.0)

    threading.Thread(target=spoil, daemon=True).start()
    return y
