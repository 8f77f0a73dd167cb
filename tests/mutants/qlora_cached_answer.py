"""Mutant: memoizes the output by input shape, as benchmark cheats do; a second call with new values is wrong."""

from lora_lab.lora import qlora_linear as _reference

EXPECTED_FAILURE = "qlora.forward_matches_float64"
_cache = {}


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    key = (tuple(x.shape), tuple(weight.shape), tuple(lora_A.shape), x.dtype, bias is None)
    if key not in _cache:
        _cache[key] = _reference(x, weight, lora_A, lora_B, scaling, bias)
    return _cache[key]
