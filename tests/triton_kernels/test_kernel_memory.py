"""The weight-sized tensors the fused op allocates, in forward and backward (issue 15, #27).

The conformance check ``memory.qlora_linear_keeps_no_dense_weight`` holds every
target to what it *keeps* for backward; the reference may still dequantize W
into a temporary during each pass. ``lora_lab.conformance.judge.memory`` sees
every tensor a torch op creates; with M < min(N, K) rows, one of N x K elements
or more can only be a weight. (Inside a kernel only tiles exist, and the
instrument cannot see them; a dense W would be made by the host code around the
kernels, which it does see.)

- fp16/bf16 below ``DENSE_FROM_M`` rows: no N x K buffer exists at all, the
  point of fusing: the kernels decode NF4 tile by tile.
- The dense path (M >= ``DENSE_FROM_M``, or fp32 above the small-M kernel's
  rows): W is dequantized once per pass, straight into x's dtype (no copy in W's
  own dtype first), and the temporary is gone once the pass is.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from lora_lab.kernels import fused_qlora_linear

from lora_lab.conformance.judge.memory import measure
from lora_lab.lora import qlora_linear
from lora_lab.nf4 import quantize_nf4

dispatch = importlib.import_module("lora_lab.kernels.fused_qlora_linear")  # the module (the package exports the function)
N, K, R = 96, 128, 8


def _dense_allocations(op, dtype: torch.dtype, rows: int, weight_dtype: torch.dtype | None = None):
    """A forward and backward of ``op`` on ``rows`` rows: the float tensors of N x K elements or more it made, and
    those of them still alive afterwards."""
    g = torch.Generator().manual_seed(0)
    weight = quantize_nf4((torch.randn(N, K, generator=g) * 0.05).to(weight_dtype or dtype), 64, True)
    x = torch.randn(rows, K, generator=g).to(dtype).requires_grad_()
    lora_A = (torch.randn(R, K, generator=g) / K**0.5).requires_grad_()
    lora_B = (torch.randn(N, R, generator=g) * 0.1).requires_grad_()
    with measure(lambda n: n >= N * K) as record:
        op(x, weight, lora_A, lora_B, 2.0).sum().backward()
    assert x.grad is not None and lora_A.grad is not None and lora_B.grad is not None
    floating = lambda seen: [s for s in seen if s.dtype.is_floating_point]  # noqa: E731 (the interpreter copies bytes)
    return floating(record.created), floating(record.alive())


@pytest.mark.parametrize("rows", [5, 40], ids=["small_m", "fused"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fused_op_allocates_no_dense_weight_in_forward_or_backward(dtype, rows):
    assert dispatch.kernel_path(rows, dtype) == ("small_m" if rows <= dispatch.SMALL_M else "fused")
    made, _ = _dense_allocations(fused_qlora_linear, dtype, rows)
    assert not made, f"the fused op allocated weight-sized tensors: {', '.join(map(str, made))}"


@pytest.mark.parametrize(("dtype", "weight_dtype"), [(torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)],
                         ids=["fp32 x", "fp16 x forced dense"])
def test_dense_path_dequantizes_once_per_pass_into_x_dtype(monkeypatch, dtype, weight_dtype):
    """One N x K buffer per pass, in x's dtype though W's is another (no copy in W's dtype to cast), none kept."""
    monkeypatch.setattr(dispatch, "FORCED_PATH", "dense" if dtype != torch.float32 else "auto")
    assert dispatch.kernel_path(40, dtype) == "dense" and dispatch.grad_input_path(40, dtype) == "dense"
    made, alive = _dense_allocations(fused_qlora_linear, dtype, 40, weight_dtype)
    buffers = [s for s in made if s.where in ("empty", "full")]  # new buffers; views and copies are listed apart
    assert len(buffers) == 2, f"expected one dense W per pass (forward, backward), got {', '.join(map(str, made))}"
    assert all(s.dtype == dtype for s in made), f"a weight-sized tensor not in x's dtype: {', '.join(map(str, made))}"
    assert not alive, f"dense weights still alive after backward: {', '.join(map(str, alive))}"


def test_the_instrument_sees_the_reference_dequantize_its_weight():
    """The reference dequantizes W into a temporary in forward and again in backward: the same count must see it."""
    made, _ = _dense_allocations(qlora_linear, torch.float32, 5)
    assert len([s for s in made if s.shape == (N, K)]) >= 2, made
