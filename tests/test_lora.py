"""QLoRALinear, the module: initialisation, merging, dropout, and bit-equality with peft on bitsandbytes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora_lab.conformance.judge.oracles import bnb_linear4bit
from lora_lab.lora import NF4Linear, QLoRALinear, lora_scaling, qlora_linear
from lora_lab.nf4 import dequantize_nf4


def _layer(k=128, n=40, bias=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    return QLoRALinear.from_linear(nn.Linear(k, n, bias=bias), **kwargs)


@settings(max_examples=15)
@given(
    k_blocks=st.integers(1, 4), n=st.integers(1, 70), r=st.sampled_from([1, 2, 8, 16]), alpha=st.sampled_from([1, 8, 16, 64]),
    rslora=st.booleans(), bias=st.booleans(), double_quant=st.booleans(), seed=st.integers(0, 2**16),
)
def test_module_equals_peft_on_bitsandbytes_bit_for_bit(k_blocks, n, r, alpha, rslora, bias, double_quant, seed):
    """Same arithmetic in the same order as peft + bitsandbytes (train mode), so output and gradients are identical."""
    import peft

    ours = _layer(64 * k_blocks, n, bias, seed, r=r, alpha=alpha, use_rslora=rslora, double_quant=double_quant)
    holder = nn.Module()
    holder.proj = bnb_linear4bit(ours.weight, ours.bias)
    model = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["proj"]))
    theirs = model.base_model.model.proj
    model.train()
    assert theirs.scaling["default"] == ours.scaling
    with torch.no_grad():
        ours.lora_B.normal_(generator=torch.Generator().manual_seed(seed))
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(3, 5, 64 * k_blocks, generator=torch.Generator().manual_seed(seed + 1))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    assert torch.equal(y1, y2)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(ours.lora_A.grad, theirs.lora_A["default"].weight.grad)
    assert torch.equal(ours.lora_B.grad, theirs.lora_B["default"].weight.grad)


def test_fresh_layer_computes_exactly_the_dequantized_base():
    layer = _layer()
    x = torch.randn(4, 128)
    expected = x @ dequantize_nf4(layer.weight).t() + layer.bias
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    assert torch.equal(layer(x), expected)


def test_adapter_init_matches_peft():
    """A is kaiming-uniform with a=sqrt(5): uniform on [-1/sqrt(K), 1/sqrt(K)]; B is zero."""
    layer = _layer(k=256, n=64, r=16)
    bound = 1 / math.sqrt(256)
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.9 * bound
    assert layer.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_merged_weight_is_base_plus_scaled_update():
    layer = _layer(r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = dequantize_nf4(layer.weight) + 2.0 * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer.merged_weight(), expected, rtol=0, atol=4 * 2.0**-24 * expected.abs().max().item())
    x = torch.randn(3, 128)
    y = x @ layer.merged_weight().t() + layer.bias
    torch.testing.assert_close(layer(x).detach(), y, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training_and_eval_is_deterministic():
    layer = _layer(dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(8, 128)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    assert torch.equal(layer(x), qlora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.scaling, layer.bias))
    layer.train()
    torch.manual_seed(1)
    first = layer(x)
    torch.manual_seed(2)
    assert not torch.equal(first, layer(x))


def test_frozen_weight_is_not_a_parameter_and_gets_no_gradient():
    layer = _layer()
    names = {name for name, _ in layer.named_parameters()}
    assert names == {"bias", "lora_A", "lora_B"}
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert "weight" not in layer.state_dict()


def test_scaling_is_alpha_over_r_or_sqrt_r():
    assert lora_scaling(32, 64) == 2.0
    assert lora_scaling(16, 64, use_rslora=True) == 16.0
    with pytest.raises(ValueError, match="positive integer"):
        lora_scaling(0, 16)


def test_low_precision_adapters_are_cast_to_x_dtype():
    layer = _layer()
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    y = qlora_linear(x, layer.weight, layer.lora_A.double(), layer.lora_B.half(), 2.0, layer.bias)
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(r=0), ValueError, "positive integer"),
    ],
)
def test_bad_module_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        _layer(**kwargs)


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="nn.Linear"):
        QLoRALinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="nn.Linear"):
        NF4Linear.from_linear(nn.Conv1d(4, 4, 1))


@pytest.mark.parametrize("bias, blocksize, double_quant", [(True, 64, True), (False, 32, False)])
def test_nf4_linear_is_a_frozen_linear_equal_to_bitsandbytes(bias, blocksize, double_quant):
    """NF4Linear (a base layer without adapters) computes what bitsandbytes' Linear4bit does, bit for bit; it trains nothing."""
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(128, 40, bias=bias), blocksize=blocksize, double_quant=double_quant)
    assert (layer.weight.blocksize, layer.weight.double_quant, layer.in_features, layer.out_features) == (
        blocksize, double_quant, 128, 40)
    assert not any(p.requires_grad for p in layer.parameters()) and not hasattr(layer, "lora_A")
    assert "weight" not in layer.state_dict()  # the NF4 weight is a plain attribute, as in QLoRALinear
    x = torch.randn(3, 5, 128, requires_grad=True)
    x_bnb = x.detach().clone().requires_grad_(True)
    y, expected = layer(x), bnb_linear4bit(layer.weight, layer.bias).train()(x_bnb)
    assert torch.equal(y, expected)
    y.sum().backward()
    expected.sum().backward()
    assert torch.equal(x.grad, x_bnb.grad)
    assert layer.to(torch.float64).weight is layer.weight  # dtype casts leave the NF4 storage alone
