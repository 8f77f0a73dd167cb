"""The small-M forward (kernels/qlora_small_m.py): two launches, right for every M <= 16, and sized to stream W.

``fused_qlora_linear`` reaches this path for M <= 16 (test_kernels.py checks it
there, gradients included); here the launcher is called directly, so that every
row count, dtype, NF4 blocksize and option is held to float64, ``x @ A^T`` (which
the backward pass keeps) included, and what the launcher decides without a GPU
(its launches, its grid) is checked too. Outputs and workspaces start as NaN, so
a partial or output element no program writes fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lora_lab.kernels import common
from lora_lab.kernels import qlora_small_m as small_m
from lora_lab.kernels.compile.launches import _Recorder
from test_kernels import DEVICE, DTYPES, build_layer, not_tile_multiple
from torch.utils._python_dispatch import TorchDispatchMode

from lora_lab.conformance.judge.compare import assert_close, assert_equal, product_bound
from lora_lab.conformance.judge.profiles import examples
from lora_lab.nf4 import dequantize_nf4

# Llama-3.1-8B's layers, (N, K): q_proj and o_proj, k_proj and v_proj, gate_proj and up_proj, down_proj.
LLAMA_LAYERS = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def small_m_forward(layer):
    """The launcher on the device, with A, B and the bias cast to x's dtype as ``fused_qlora_linear`` casts them."""
    x, weight, lora_A, lora_B, scaling, bias = layer
    as_x = lambda t: None if t is None else t.to(x.dtype).contiguous().to(DEVICE)  # noqa: E731
    y, xa = small_m.qlora_small_m_forward(x.to(DEVICE), weight.to(DEVICE), as_x(lora_A), as_x(lora_B), scaling, as_x(bias))
    return y.cpu(), xa.cpu()


def check_against_float64(layer) -> None:
    """y and x @ A^T within product_bound of float64 from the dequantized W; both in x's dtype."""
    x, weight, lora_A, lora_B, scaling, bias = layer
    y, xa = small_m_forward(layer)
    x64, a64, b64 = (t.to(x.dtype).double() for t in (x, lora_A, lora_B))
    w64 = dequantize_nf4(weight).to(x.dtype).double()
    xa_want = x64 @ a64.t()
    y_want = x64 @ w64.t() + scaling * xa_want @ b64.t() + (0 if bias is None else bias.to(x.dtype).double())
    magnitude_xa = x64.abs() @ a64.abs().t()
    magnitude_y = x64.abs() @ w64.abs().t() + abs(scaling) * magnitude_xa @ b64.abs().t()
    magnitude_y = magnitude_y + (0 if bias is None else bias.to(x.dtype).double().abs())
    K, r = x.shape[-1], lora_A.shape[0]
    grid = small_m.small_m_grid(x.shape[0], *weight.shape, weight.blocksize, x.dtype)
    where = (f"x {tuple(x.shape)} {x.dtype}, W {tuple(weight.shape)} {weight.dtype} blocksize {weight.blocksize} "
             f"dq={weight.double_quant}, r={r}, bias={bias is not None}, grid {grid}")
    assert y.dtype == x.dtype and xa.dtype == x.dtype, f"y is {y.dtype}, xa {xa.dtype}, x {x.dtype} ({where})"
    assert_close(xa, xa_want, product_bound(magnitude_xa, K, x.dtype), f"x @ A^T ({where})")
    assert_close(y, y_want, product_bound(magnitude_y, K + r, x.dtype), f"y ({where})")


@st.composite
def small_layers(draw):
    """M from 1 to 16, N never a multiple of 16, K up to 512 in whole NF4 blocks of 32, 64 or 128."""
    blocksize = draw(st.sampled_from((32, 64, 128)))
    dtype = draw(st.sampled_from(DTYPES))
    return build_layer(
        lead=(draw(st.integers(1, small_m.SMALL_M)),),
        N=draw(not_tile_multiple(1, 150)),
        K=blocksize * draw(st.integers(1, 512 // blocksize)),
        r=draw(st.one_of(st.integers(1, 8), st.sampled_from((16, 31)))),
        blocksize=blocksize,
        dtype=dtype,
        weight_dtype=draw(st.sampled_from(DTYPES)),
        adapter_dtype=draw(st.sampled_from((dtype, torch.float32))),
        double_quant=draw(st.booleans()),
        with_bias=draw(st.booleans()),
        scaling=draw(st.sampled_from((0.5, 2.0))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=examples(12), deadline=None)
@given(small_layers())
@example(build_layer((1,), 131, 512, 8, 32, torch.bfloat16, torch.bfloat16, torch.bfloat16, True, True, 2.0, seed=2))
@example(build_layer((16,), 77, 384, 16, 128, torch.float16, torch.float32, torch.float32, False, False, 0.5, seed=3))
@example(build_layer((9,), 45, 256, 5, 64, torch.float32, torch.bfloat16, torch.float32, True, True, 2.0, seed=4))
def test_matches_float64(layer):
    check_against_float64(layer)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", (32, 64, 128))
def test_every_dtype_and_blocksize_with_many_slices(dtype, blocksize):
    """A narrow, deep layer: K split in as many slices as it has steps, the LoRA product spread over them."""
    layer = build_layer((5,), 19, 1024, 3, blocksize, dtype, dtype, dtype, blocksize != 64, True, 2.0, seed=blocksize)
    grid = small_m.small_m_grid(5, 19, 1024, blocksize, dtype)
    assert grid[1] > 1, f"expected K split in several slices, got the grid {grid}"
    check_against_float64(layer)


def test_deterministic():
    """The split partials are summed in a fixed order (no atomics): two calls give the same bits."""
    layer = build_layer((7,), 40, 1024, 4, 64, torch.bfloat16, torch.bfloat16, torch.float32, True, True, 2.0, seed=5)
    first, second = small_m_forward(layer), small_m_forward(layer)
    assert_equal(first[0], second[0], "y of a second call")
    assert_equal(first[1], second[1], "x @ A^T of a second call")


class DeviceWork(TorchDispatchMode):
    """The torch ops a call dispatches that do device work (a kernel each on a GPU): not allocations, not views."""

    FREE = {"empty", "empty_strided", "t", "transpose", "view", "as_strided", "alias", "detach", "expand"}

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name not in self.FREE:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("double_quant", (False, True))
def test_a_call_is_two_launches(monkeypatch, double_quant):
    """LAUNCHES Triton launches and no torch op that does device work (outputs not poisoned: that is a fill)."""
    monkeypatch.setattr(common, "POISON_OUTPUTS", False)
    x, weight, lora_A, lora_B, scaling, bias = build_layer(
        (3,), 40, 256, 4, 64, torch.bfloat16, torch.bfloat16, torch.bfloat16, double_quant, True, 2.0, seed=6)
    recorders = {name: _Recorder(name, getattr(small_m, name)) for name in small_m.LAUNCHES}
    for name, recorder in recorders.items():
        monkeypatch.setattr(small_m, name, recorder)
    small_m.qlora_small_m_forward(x, weight, lora_A, lora_B, scaling, bias)  # fills the launcher's caches
    recorders = {name: _Recorder(name, recorder.kernel) for name, recorder in recorders.items()}
    for name, recorder in recorders.items():
        monkeypatch.setattr(small_m, name, recorder)
    with DeviceWork() as work:
        small_m.qlora_small_m_forward(x, weight, lora_A, lora_B, scaling, bias)
    assert [len(r.launches) for r in recorders.values()] == [1, 1] and len(small_m.LAUNCHES) == 2
    assert work.ops == [], f"device work besides the kernels: {work.ops}"


@pytest.mark.parametrize("layer", LLAMA_LAYERS)
def test_llama_layers_keep_every_sm_streaming_at_one_row(layer):
    """At M = 1 (decoding one sequence) the GPU grid has at least 512 programs (132 SMs, about 4 each) and the
    split partials, written and read back, add at most a quarter of W's NF4 bytes."""
    N, K = LLAMA_LAYERS[layer]
    block_n, block_k = small_m.GPU_TILE[:2]
    split = small_m.split_k_for(N, K // block_k, block_n, 1, block_k)
    assert (K // block_k) % split == 0
    assert -(-N // block_n) * split >= 512, f"{layer}: {-(-N // block_n)} x {split} programs"
    assert small_m.workspace_share(split, 1, K) <= 0.25, f"{layer}: split {split}"


@pytest.mark.parametrize("layer", LLAMA_LAYERS)
def test_more_rows_never_more_slices(layer):
    """Each slice's partial grows with M while W does not: the split never grows with the rows."""
    N, K = LLAMA_LAYERS[layer]
    block_n, block_k = small_m.GPU_TILE[:2]
    splits = [small_m.split_k_for(N, K // block_k, block_n, m, block_k) for m in range(1, small_m.SMALL_M + 1)]
    assert splits == sorted(splits, reverse=True), splits


def test_rejects_what_the_kernels_cannot_take():
    x, weight, lora_A, lora_B, scaling, bias = build_layer(
        (17,), 20, 128, 4, 64, torch.float32, torch.float32, torch.float32, False, False, 2.0, seed=7)
    with pytest.raises(ValueError, match="1 to 16 rows"):
        small_m.qlora_small_m_forward(x, weight, lora_A, lora_B, scaling, bias)
    with pytest.raises(ValueError, match=r"expected B of shape \(20, 4\)"):
        small_m.qlora_small_m_forward(x[:2], weight, lora_A, lora_B[:, :3], scaling, bias)
