"""Mutant: memoizes quantized weights by data_ptr(), stale as soon as the caller writes new values into the same tensor."""

from lora_lab.nf4 import quantize_nf4 as _reference

EXPECTED_FAILURE = "nf4.bytes_match_bitsandbytes"
_cache = {}


def quantize_nf4(weight, blocksize=64, double_quant=False):
    key = (weight.data_ptr(), tuple(weight.shape), blocksize, double_quant)
    if key not in _cache:
        _cache[key] = _reference(weight, blocksize, double_quant)
    return _cache[key]
