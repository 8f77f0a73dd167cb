"""Reference-only properties of lora_lab.nf4 that are not part of the conformance protocol."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_lab.conformance.judge.strategies import nf4_weights as weights
from lora_lab.nf4 import NF4_CODE, NF4Tensor, dequantize_nf4, dynamic_map, quantize_nf4


def test_code_tables_are_bitsandbytes_own():
    import bitsandbytes.functional as F
    from bitsandbytes.backends.utils import _get_4bit_code

    assert torch.equal(NF4_CODE, _get_4bit_code("nf4", torch.device("cpu")))
    assert torch.equal(dynamic_map(), F.create_dynamic_map())


@settings(max_examples=20)
@given(weights(), st.booleans())
def test_from_bnb_wraps_bitsandbytes_state_losslessly(drawn, double_quant):
    import bitsandbytes.functional as F

    weight, blocksize = drawn
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    ours = NF4Tensor.from_bnb(packed, state)
    theirs = quantize_nf4(weight, blocksize, double_quant)
    assert torch.equal(ours.packed, theirs.packed)
    assert torch.equal(dequantize_nf4(ours), dequantize_nf4(theirs))
    again = NF4Tensor.from_bnb(*theirs.to_bnb())
    assert torch.equal(again.absmax, theirs.absmax) and again.double_quant == double_quant


def test_nbytes_counts_codes_and_statistics():
    w = torch.randn(256, 512)
    plain, double = quantize_nf4(w, 64), quantize_nf4(w, 64, double_quant=True)
    blocks = w.numel() // 64
    assert plain.nbytes == w.numel() // 2 + 4 * blocks
    assert double.nbytes == w.numel() // 2 + blocks + 4 * -(-blocks // 256) + 4
    # Double quantization is the ~0.37 bits per weight that QLoRA's paper promises.
    saved_bits = 8 * (plain.nbytes - double.nbytes) / w.numel()
    assert 0.35 < saved_bits < 0.5


@pytest.mark.parametrize(
    "weight, blocksize, expected",
    [
        (torch.ones(64, dtype=torch.int32), 64, "float32, float16 or bfloat16"),
        (torch.randn(64), 100, "power of two from 32 to 4096"),
        (torch.randn(64), True, "power of two from 32 to 4096"),
        (torch.empty(0), 64, "non-empty"),
        (torch.tensor([0.0, float("nan")]), 64, "finite"),
        (torch.tensor([0.0, float("-inf")]), 64, "finite"),
    ],
)
def test_bad_input_names_what_was_expected(weight, blocksize, expected):
    with pytest.raises(ValueError, match=expected):
        quantize_nf4(weight, blocksize)


def test_dequantize_rejects_a_dense_tensor():
    with pytest.raises(TypeError, match="NF4Tensor"):
        dequantize_nf4(torch.randn(4, 4))
