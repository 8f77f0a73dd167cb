"""Mutant: memoizes by x.data_ptr(), the cheat that reuses an answer when the allocator hands back the same address."""

from lora_lab.lora import qlora_linear as _reference

EXPECTED_FAILURE = "qlora.forward_matches_float64"
_cache = {}


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    key = (x.data_ptr(), tuple(x.shape), x.dtype)
    if key not in _cache:
        _cache[key] = _reference(x, weight, lora_A, lora_B, scaling, bias).detach()
    return _cache[key].clone()
