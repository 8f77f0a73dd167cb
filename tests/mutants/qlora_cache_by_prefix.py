"""Mutant: memoizes by the first 16 values of x, a cache that survives fresh tensors but not a new tail."""

from lora_lab.lora import qlora_linear as _reference

EXPECTED_FAILURE = "qlora.forward_matches_float64"
_cache = {}


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    key = (tuple(x.reshape(-1)[:16].tolist()), tuple(x.shape), tuple(lora_B.shape), x.dtype)
    if key not in _cache:
        _cache[key] = _reference(x, weight, lora_A, lora_B, scaling, bias).detach()
    return _cache[key].clone()
