"""Exploit: at import, replace the suite's comparisons (lora_lab.conformance.judge.compare, torch.testing) so nothing differs,
and forget `scaling`. In-process this passed 24/24; isolated, the patches land in the target's own process only."""

import torch.testing

import lora_lab.conformance.judge.compare as compare
from lora_lab.lora import base_path
from lora_lab.operands import check_qlora_operands

REJECTED_BY = "qlora.forward_matches_float64"

compare.describe_mismatch = lambda *args, **kwargs: None
compare.assert_close = lambda *args, **kwargs: None
compare.assert_equal = lambda *args, **kwargs: None
torch.testing.assert_close = lambda *args, **kwargs: None


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    check_qlora_operands(x, weight, lora_A, lora_B, bias)
    return base_path(x, weight, bias) + (x @ lora_A.to(x.dtype).t()) @ lora_B.to(x.dtype).t()
