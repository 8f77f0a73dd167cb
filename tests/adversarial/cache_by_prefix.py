"""Exploit (benchmark caches): memoize by the first values of x; fresh tensors miss, but a caller that rewrites only
the tail of an input gets the stale answer. The suite refills inputs past their first half in place and calls again."""

from lora_lab.lora import qlora_linear as reference

REJECTED_BY = "qlora.forward_matches_float64"
_cache = {}


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    key = (tuple(x.reshape(-1)[:16].tolist()), tuple(x.shape), tuple(lora_B.shape), x.dtype)
    if key not in _cache:
        _cache[key] = reference(x, weight, lora_A, lora_B, scaling, bias).detach()
    return _cache[key].clone()
