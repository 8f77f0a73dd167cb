"""The library bugs the compatibility matrix publishes (docs/compat/README.md), each reproduced on its own.

Every finding is shown here with the libraries alone, no lora_lab code on the
path that produces the number, so that what the matrix says can be checked by
anyone. If a library fixes one, its test fails, and the matrix and the known
failures in test_properties.py need updating.
"""

import pytest
import torch

from lora_lab.nf4 import NF4_CODE


@pytest.fixture
def torchao_nf4():
    pytest.importorskip("torchao")
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    return to_nf4


def test_torchao_dequantizes_an_all_zero_block_to_non_zeros(torchao_nf4):
    w = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))  # 256 blocks of 64: torchao's defaults
    w[0] = 0  # one all-zero block
    w[1, 0] = 8.0  # and one outlier elsewhere
    back = torchao_nf4(w).get_original_weight()
    assert back[0].abs().max() > 0.01  # 0/0 is NaN, the nearest-level search picks level -1, the absmax is not 0


def test_torchao_levels_are_four_decimal_roundings_of_nf4(torchao_nf4):
    levels = torchao_nf4(torch.randn(2, 64), 64, 2).nf4
    off = (levels.double() - NF4_CODE.double()).abs()
    assert 4e-5 < off.max() < 5e-5 and int(off.argmax()) == 6  # -0.0911 against -0.09105003...


def test_torchao_fp16_double_quantization_overflows_for_small_weights(torchao_nf4):
    w = (torch.randn(256, 64, generator=torch.Generator().manual_seed(0)) * 1e-3).half()
    q = torchao_nf4(w)
    assert torch.isinf(q.quantization_factor).all()  # 256 / (2 * spread) > 65504: every absmax decodes to the mean
    absmax = w.float().abs().reshape(-1, 64).amax(1)
    error = ((q.get_original_weight().float() - w.float()).abs().reshape(-1, 64).amax(1) / absmax).max()
    assert error > 0.5  # NF4's own error is at most half the widest level gap, 0.152 of the absmax


def test_bitsandbytes_dequantize_4bit_changes_the_shape_of_small_weights():
    import bitsandbytes.functional as bnb_functional

    for shape, returned in (((10,), (1, 10)), ((1, 2), (2, 1)), ((2, 1), (1, 2))):
        packed, state = bnb_functional.quantize_4bit(torch.randn(shape), blocksize=64, quant_type="nf4")
        with torch.compiler.set_stance("force_eager"):  # bitsandbytes compiles its CPU dequantizer: minutes per shape
            assert tuple(bnb_functional.dequantize_4bit(packed, state).shape) == returned


def test_bitsandbytes_quantizes_nan_and_empty_weights_without_complaint():
    import bitsandbytes.functional as bnb_functional

    bnb_functional.quantize_4bit(torch.tensor([1.0, float("nan")] * 32), blocksize=64, quant_type="nf4")
    bnb_functional.quantize_4bit(torch.empty(0, 4), blocksize=64, quant_type="nf4")


def test_bitsandbytes_linear4bit_eval_mode_on_an_avx512_bf16_cpu_is_approximate():
    """Only where the CPU has AVX512-BF16 (bitsandbytes' ``has_avx512bf16``) does eval mode repack the weight and
    compute approximately; elsewhere (an AMD EPYC with AVX2 only, say) it is as exact as train mode."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(torch.nn.Linear(64, 64, bias=False).state_dict())
    layer = layer.to("cpu")  # quantizes
    x = torch.randn(3, 64)
    exact = x.double() @ bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double().t()
    assert (layer.train()(x).double() - exact).abs().max() < 1e-5
    eval_error = (layer.eval()(x).double() - exact).abs().max()
    if bnb_functional.has_avx512bf16():
        assert eval_error > 1e-3  # eval repacks the weight, computes approximately
    else:
        assert eval_error < 1e-5


def test_peft_ignores_a_target_module_that_matches_nothing_when_another_matches():
    import peft

    model = torch.nn.Module()
    model.q_proj = torch.nn.Linear(4, 4)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "qkv_proj"]))
    assert any("lora_A" in name for name, _ in peft_model.named_parameters())  # no error for the misspelt qkv_proj


def test_bitsandbytes_avx512_dequantize_4bit_misreads_blocks_when_a_row_is_not_a_multiple_of_32():
    """bitsandbytes' AVX512 CPU kernel indexes blocks per row; on a CPU without AVX512 (an AMD EPYC with AVX2) the
    same call reads every block right."""
    import copy

    import bitsandbytes.functional as bnb_functional

    w = torch.randn(2, 48, generator=torch.Generator().manual_seed(0))  # rows of 48: blocks of 32 straddle them
    packed, state = bnb_functional.quantize_4bit(w, blocksize=32, quant_type="nf4")
    flat = copy.deepcopy(state)
    flat.shape = torch.Size([w.numel()])  # the same bytes, asked as one row
    with torch.compiler.set_stance("force_eager"):
        as_rows, as_one_row = bnb_functional.dequantize_4bit(packed, state), bnb_functional.dequantize_4bit(packed, flat)
    assert (as_one_row.reshape(2, 48) - w).abs().max() < 0.2 * w.abs().max()  # NF4's own error
    misread = (as_rows - as_one_row.reshape(2, 48)).abs().max()
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert misread > 0.5  # the 2-D call reads some blocks wrongly
    else:
        assert misread == 0
