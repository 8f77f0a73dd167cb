"""What the conformance suite cannot see about the Triton kernels (lora_lab.kernels).

The suite (tests/conformance/test_properties.py) already holds the kernels to the
qlora_linear contract on small shapes. Here we test what is specific to tiling:
shapes spanning several tiles in M, N and K (K up to 1024), a weight stored in
another dtype than x, strided inputs, every tile written (outputs are poisoned
with NaN), tile shapes other than the default, the exact decoding of W inside
the matmuls, and a whole training step through ``backend="triton"``.

Without a GPU everything runs under Triton's interpreter; on a GPU the same
tests run the compiled kernels (see benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import importlib
import importlib.util

import lora_lab.kernels as kernels
import pytest
import torch
import triton
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lora_lab.kernels import common, fused_qlora_linear, nf4_dequantize
from lora_lab.kernels.qlora_backward import qlora_grad_input_kernel
from lora_lab.kernels.qlora_forward import qlora_forward_kernel
from lora_lab.kernels.qlora_small_m import SMALL_M, split_k_for
from torch.utils._python_dispatch import TorchDispatchMode

from lora_lab.conformance.judge.compare import assert_close, assert_equal, product_bound, seeded_generator
from lora_lab.conformance.judge.profiles import examples
from lora_lab.lora import QLoRALinear, qlora_linear
from lora_lab.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

dispatch = importlib.import_module("lora_lab.kernels.fused_qlora_linear")  # the module (the package exports the function)
DEVICE = "cuda" if torch.cuda.is_available() and not kernels.INTERPRETING else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def not_tile_multiple(lo: int, hi: int):
    """Sizes that are no multiple of 16, hence of no tile size (1 included)."""
    return st.integers(lo, hi).filter(lambda n: n % 16 != 0)


# ------------------------------------------------------------------------------------------- nf4_dequantize


@settings(max_examples=examples(30))
@given(
    numel=st.integers(1, 20000),
    blocksize=st.sampled_from((32, 64, 128, 256, 512, 1024, 2048, 4096)),
    double_quant=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from((1e-3, 1.0, 300.0)),
    zero_block=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_dequantize_is_bit_exact(numel, blocksize, double_quant, dtype, scale, zero_block, seed):
    """One kernel, double quant included, equals dequantize_nf4 bit for bit (bf16 rounding emulated when interpreting)."""
    weight = torch.randn(numel, generator=seeded_generator(seed)) * scale
    if zero_block:
        weight[:blocksize] = 0  # absmax 0: must decode to zeros, not NaN
    q = quantize_nf4(weight.to(dtype), blocksize, double_quant)
    got = nf4_dequantize(q.to(DEVICE))
    assert_equal(got.cpu(), dequantize_nf4(q), f"nf4_dequantize (numel={numel}, blocksize={blocksize}, dq={double_quant})")


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight_dtype", DTYPES, ids=str)
def test_dequantize_into_another_dtype_rounds_twice_as_the_reference(weight_dtype, out_dtype):
    """nf4_dequantize(q, dtype) is dequantize_nf4(q).to(dtype) bit for bit: rounded to W's dtype first, then dtype's.

    Scales from 1e-6 to 300 put values where fp16 is subnormal or bf16 and fp16 round differently."""
    g = seeded_generator(12)
    weight = torch.randn(64, 96, generator=g) * torch.logspace(-6, 2.5, 96)
    q = quantize_nf4(weight.to(weight_dtype), 32, double_quant=True)
    got = nf4_dequantize(q.to(DEVICE), out_dtype)
    assert got.dtype == out_dtype
    assert_equal(got.cpu(), dequantize_nf4(q).to(out_dtype), f"nf4_dequantize({weight_dtype} W, {out_dtype})")


def test_dequantize_keeps_shape_and_leaves_the_weight_alone():
    q = quantize_nf4(torch.randn(3, 5, 67, dtype=torch.bfloat16), 64, double_quant=True).to(DEVICE)
    before = [t.clone() for t in (q.packed, q.absmax, q.absmax_code, q.absmax_scale)]
    out = nf4_dequantize(q)
    assert out.shape == (3, 5, 67) and out.dtype == torch.bfloat16
    for old, new in zip(before, (q.packed, q.absmax, q.absmax_code, q.absmax_scale)):
        assert torch.equal(old, new)


def test_dequantize_rejects_a_corrupt_tensor():
    q = quantize_nf4(torch.randn(256), 64)
    broken = NF4Tensor(q.packed[:-1], q.absmax, q.blocksize, q.shape, q.dtype)
    with pytest.raises(ValueError, match="packed bytes"):
        nf4_dequantize(broken)
    with pytest.raises(TypeError, match="NF4Tensor"):
        nf4_dequantize(torch.randn(4))


# ------------------------------------------------------------------------------------------- fused_qlora_linear


def build_layer(lead, N, K, r, blocksize, dtype, weight_dtype, adapter_dtype, double_quant, with_bias, scaling, seed):
    """``(x, weight, lora_A, lora_B, scaling, bias)`` on the CPU, with magnitudes like a real layer's."""
    g = seeded_generator(seed)
    weight = quantize_nf4((torch.randn(N, K, generator=g) * 0.05).to(weight_dtype), blocksize, double_quant)
    x = torch.randn(*lead, K, generator=g).to(dtype)
    lora_A = (torch.randn(r, K, generator=g) / K**0.5).to(adapter_dtype)
    lora_B = (torch.randn(N, r, generator=g) * 0.1).to(adapter_dtype)
    bias = (torch.randn(N, generator=g) * 0.1).to(adapter_dtype) if with_bias else None
    return x, weight, lora_A, lora_B, scaling, bias


@st.composite
def layers(draw, max_k: int = 1024):
    """A QLoRA layer and input spanning several tiles: M, N up to 150 (never a multiple of 16), K up to 1024."""
    blocksize = draw(st.sampled_from((32, 64, 128, 256)))
    dtype = draw(st.sampled_from(DTYPES))
    return build_layer(
        lead=draw(st.one_of(st.tuples(not_tile_multiple(1, 150)), st.tuples(st.integers(2, 3), not_tile_multiple(1, 40)))),
        N=draw(not_tile_multiple(1, 150)),
        K=blocksize * draw(st.integers(1, max_k // blocksize)),
        r=draw(st.one_of(st.integers(1, 8), st.sampled_from((16, 31, 64)))),
        blocksize=blocksize,
        dtype=dtype,
        weight_dtype=draw(st.sampled_from(DTYPES)),  # W rounds to its own dtype, then to x's
        adapter_dtype=draw(st.sampled_from((dtype, torch.float32))),
        double_quant=draw(st.booleans()),
        with_bias=draw(st.booleans()),
        scaling=draw(st.sampled_from((0.5, 2.0, 64 / 8**0.5))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# The largest case, always run: several tiles in M and N, K = 1024, r = 64, every option on.
LARGEST = build_layer((2, 67), 149, 1024, 64, 64, torch.bfloat16, torch.float16, torch.float32, True, True, 2.0, seed=1)


def float64_forward_and_grads(x, weight, lora_A, lora_B, scaling, bias, grad_out):
    """y and the gradients of (x, A, B, bias) in float64, from the dequantized weight; A, B, bias seen in x's dtype."""
    as64 = lambda t: None if t is None else t.detach().to(x.dtype).double().requires_grad_()  # noqa: E731
    x64, a64, b64, bias64 = as64(x), as64(lora_A), as64(lora_B), as64(bias)
    w64 = dequantize_nf4(weight.to("cpu")).to(x.dtype).double()
    y = x64 @ w64.t() + scaling * (x64 @ a64.t()) @ b64.t()
    y = y if bias64 is None else y + bias64
    y.backward(grad_out.double())
    return y.detach(), [None if t is None else t.grad for t in (x64, a64, b64, bias64)]


def error_bounds(x, weight, lora_A, lora_B, scaling, bias, grad_out):
    """product_bound of each result: |terms| summed, over the length of its longest sum (see compare.py)."""
    s, dtype = abs(scaling), x.dtype
    cast = lambda t: t.detach().to(dtype).double().abs()  # noqa: E731
    ax, aa, ab = cast(x).reshape(-1, x.shape[-1]), cast(lora_A), cast(lora_B)
    aw = dequantize_nf4(weight.to("cpu")).to(dtype).double().abs()
    g = grad_out.double().abs().reshape(-1, grad_out.shape[-1])
    M, K, N, r = ax.shape[0], ax.shape[1], aw.shape[0], aa.shape[0]
    y = ax @ aw.t() + s * (ax @ aa.t()) @ ab.t() + (0 if bias is None else cast(bias))
    return {
        "y": product_bound(y, K + r, dtype).reshape(grad_out.shape),
        "x": product_bound(g @ aw + s * (g @ ab) @ aa, N + r, dtype).reshape(x.shape),
        "lora_A": product_bound(s * (g @ ab).t() @ ax, M + N, dtype),
        "lora_B": product_bound(s * g.t() @ (ax @ aa.t()), M + K, dtype),
        "bias": product_bound(g.sum(0), M, dtype),
    }


def check_against_float64(layer, grad_seed: int = 0, transform_x=lambda x: x) -> None:
    """Forward and all four gradients within the bounds; inputs (and the NF4 weight) unchanged by the calls."""
    x, weight, lora_A, lora_B, scaling, bias = layer
    leaves = [None if t is None else t.detach().clone().to(DEVICE).requires_grad_() for t in (x, lora_A, lora_B, bias)]
    weight_dev = weight.to(DEVICE)
    snapshot = [t.detach().clone() for t in leaves if t is not None] + [weight_dev.packed.clone(), weight_dev.absmax.clone()]
    y = fused_qlora_linear(transform_x(leaves[0]), weight_dev, leaves[1], leaves[2], scaling, leaves[3])
    grad_out = torch.randn(y.shape, generator=seeded_generator(grad_seed)).to(y.dtype)
    y.backward(grad_out.to(DEVICE))
    where = (
        f"x {tuple(x.shape)} {x.dtype}, W {tuple(weight.shape)} {weight.dtype} blocksize {weight.blocksize} "
        f"dq={weight.double_quant}, r={lora_A.shape[0]}, A/B {lora_A.dtype}, bias={bias is not None}"
    )
    want_y, want_grads = float64_forward_and_grads(x, weight, lora_A, lora_B, scaling, bias, grad_out)
    bounds = error_bounds(x, weight, lora_A, lora_B, scaling, bias, grad_out)
    assert y.dtype == x.dtype
    assert_close(y.cpu(), want_y, bounds["y"], f"y ({where})")
    for name, leaf, want in zip(("x", "lora_A", "lora_B", "bias"), leaves, want_grads):
        if leaf is not None:
            assert leaf.grad.dtype == leaf.dtype, f"gradient of {name} must have {name}'s dtype"
            assert_close(leaf.grad.cpu(), want, bounds[name], f"gradient of {name} ({where})")
    after = [t.detach() for t in leaves if t is not None] + [weight_dev.packed, weight_dev.absmax]
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after)), "an input was modified"


@settings(max_examples=examples(20))
@given(layers(), st.integers(0, 2**31 - 1))
@example(LARGEST, 0)
def test_forward_and_gradients_match_float64(layer, grad_seed):
    """Multi-tile shapes: y, dX, dA, dB and dbias within product_bound of the float64 reference."""
    check_against_float64(layer, grad_seed)


@pytest.mark.parametrize("path", ["small_m", "fused", "dense"])
@settings(max_examples=examples(6))
@given(layer=layers(), grad_seed=st.integers(0, 2**31 - 1))
def test_every_kernel_path_matches_float64(path, layer, grad_seed):
    """Each path fused_qlora_linear dispatches to by M (split-K small M, fused NF4, dequantize-once dense) is right.

    ``small_m`` runs only where it applies (M <= 16, split in as many K slices as the grid wants); the other two
    are forced for every M.
    """
    x = layer[0]
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    if path == "small_m":
        layer = (x.reshape(-1, x.shape[-1])[: min(rows, SMALL_M)],) + layer[1:]
    with pytest.MonkeyPatch.context() as patch:  # per example: hypothesis reuses one function-scoped fixture
        patch.setattr(dispatch, "FORCED_PATH", "auto" if path == "small_m" else path)
        check_against_float64(layer, grad_seed)


def test_dispatch_by_rows():
    """M <= 16: small-M kernel; up to DENSE_FROM_M: fused; from there: dequantize once (with the env var unset).
    fp32 never reaches the NF4 matmul kernels: above 16 rows, and for dX at every M, it is dequantize + cuBLAS."""
    assert dispatch.FORCED_PATH == "auto", "LORA_LAB_KERNEL_PATH is set: the default dispatch is not under test"
    rows = (1, 16, 17, dispatch.DENSE_FROM_M - 1, dispatch.DENSE_FROM_M)
    for dtype in (torch.float16, torch.bfloat16):
        assert [dispatch.kernel_path(m, dtype) for m in rows] == ["small_m", "small_m", "fused", "fused", "dense"]
        assert [dispatch.grad_input_path(m, dtype) for m in rows] == ["fused", "fused", "fused", "fused", "dense"]
    assert [dispatch.kernel_path(m, torch.float32) for m in rows] == ["small_m", "small_m", "dense", "dense", "dense"]
    assert {dispatch.grad_input_path(m, torch.float32) for m in rows} == {"dense"}


class Launches(TorchDispatchMode):
    """The GPU work of a call in order: each Triton launch by kernel name, each torch op that runs a kernel as
    ``aten.<op>`` (allocations and views run none). Ops inside a Triton launch (the interpreter's copies) are not
    counted."""

    NO_KERNEL = {"empty", "empty_strided", "full", "t", "view", "_unsafe_view", "detach", "alias", "transpose",
                 "as_strided", "expand", "reshape", "_reshape_alias", "unsqueeze", "squeeze", "slice", "select"}

    def __init__(self, monkeypatch, *modules_and_kernels) -> None:
        super().__init__()
        self.names: list[str] = []
        self.inside_kernel = False
        for module, name in modules_and_kernels:
            monkeypatch.setattr(module, name, self._counted(name, getattr(module, name)))

    def _counted(self, name, kernel):
        mode = self

        class Counted:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    mode.names.append(name)
                    mode.inside_kernel = True
                    try:
                        return kernel[grid](*args, **kwargs)
                    finally:
                        mode.inside_kernel = False
                return launch

        return Counted()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside_kernel and name not in self.NO_KERNEL:
            self.names.append(f"aten.{name}")
        return func(*args, **(kwargs or {}))


# (fp16 on the dense path: under the interpreter nf4_dequantize writes bf16 through an fp32 buffer, one cast more)
@pytest.mark.parametrize(("path", "dtype", "with_bias"), [("fused", torch.bfloat16, True), ("dense", torch.float16, True),
                                                      ("dense", torch.float32, True), ("dense", torch.float16, False),
                                                      ("small_m", torch.bfloat16, True)],
                         ids=str)
def test_each_path_launches_what_it_declares(monkeypatch, path, dtype, with_bias):
    """The forward and dX run LAUNCHES[path], no more: the small-M kernel and its reduction (small_m, whose dX is
    the fused one), or x @ A^T and dY @ B once per call, then one Triton kernel (fused) or the LoRA term,
    nf4_dequantize and the GEMM on W accumulating into it (dense), with A, B and the bias
    already in x's dtype. LAUNCHES lists the dense forward with a bias; without one its aten.addmm is an aten.mm."""
    monkeypatch.setattr(dispatch, "FORCED_PATH", path)
    forward, backward, dequantize, small = (importlib.import_module(f"lora_lab.kernels.{m}")
                                            for m in ("qlora_forward", "qlora_backward", "nf4_dequantize", "qlora_small_m"))
    kernels_ = [(forward, "qlora_forward_kernel"), (backward, "qlora_grad_input_kernel"),
                (dequantize, "nf4_dequantize_kernel"), *((small, name) for name in small.LAUNCHES)]
    g = seeded_generator(13)
    N, K, M, r = 40, 128, 5 if path == "small_m" else 24, 4
    weight = quantize_nf4(torch.randn(N, K, generator=g) * 0.05, 64, double_quant=True).to(DEVICE)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype).requires_grad_()
    lora_A, lora_B, bias = (torch.randn(*shape, generator=g).to(DEVICE, dtype) for shape in ((r, K), (N, r), (N,)))
    bias = bias if with_bias else None
    fused_qlora_linear(x, weight, lora_A, lora_B, 2.0, bias).sum().backward()  # once-per-process tables are made here
    x.grad = None
    with Launches(monkeypatch, *kernels_) as launches:
        y = fused_qlora_linear(x, weight, lora_A, lora_B, 2.0, bias)
    declared = list(dispatch.LAUNCHES[path]["forward"])
    if path == "dense" and not with_bias:
        declared[declared.index("aten.addmm")] = "aten.mm"
    assert launches.names == declared
    grad_y = torch.randn(M, N, generator=g).to(DEVICE, dtype)
    with Launches(monkeypatch, *kernels_) as launches:
        y.backward(grad_y)  # only x needs a gradient: dX and nothing else
    assert launches.names == list(dispatch.LAUNCHES[path]["grad_input"])


def test_small_m_splits_k_over_the_grid():
    """A narrow, deep layer is split into many K slices (the grid would otherwise be one program), and stays right."""
    assert split_k_for(20, 1024 // 64) == 16
    g = seeded_generator(9)
    weight = quantize_nf4(torch.randn(20, 1024, generator=g) * 0.05, 64, double_quant=True)
    layer = (torch.randn(3, 1024, generator=g), weight, torch.randn(4, 1024, generator=g) / 32,
             torch.randn(20, 4, generator=g), 2.0, torch.randn(20, generator=g))
    check_against_float64(layer)


@settings(max_examples=examples(4))
@given(layers(max_k=256))
def test_strided_input(layer):
    """x that is a non-contiguous view (every other column of a wider tensor) gives the same result."""

    def every_other_column(x):
        wide = torch.stack([x, torch.full_like(x, float("nan"))], dim=-1).reshape(*x.shape[:-1], 2 * x.shape[-1])
        return wide[..., ::2]

    # The leaf is x itself; the strided view is built from it, so its gradient is still checked.
    check_against_float64(layer, transform_x=every_other_column)


class MatmulPrecision(TorchDispatchMode):
    """Whether TF32 was allowed at each matmul torch ran."""

    def __init__(self) -> None:
        super().__init__()
        self.tf32_at_matmuls: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("mm", "addmm", "addmm_"):
            self.tf32_at_matmuls.append(torch.backends.cuda.matmul.allow_tf32)
        return func(*args, **(kwargs or {}))


def test_fp32_matmuls_run_in_ieee_even_where_tf32_is_allowed():
    """fp32's tolerance is fp32's: a caller's global allow_tf32 is off during the op's matmuls, and restored after."""
    g = seeded_generator(14)
    weight = quantize_nf4(torch.randn(40, 128, generator=g) * 0.05, 64).to(DEVICE)
    x = torch.randn(24, 128, generator=g).to(DEVICE).requires_grad_()
    lora_A, lora_B = torch.randn(4, 128, generator=g).to(DEVICE), torch.randn(40, 4, generator=g).to(DEVICE)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with MatmulPrecision() as seen:
            fused_qlora_linear(x, weight, lora_A.requires_grad_(), lora_B.requires_grad_(), 2.0).sum().backward()
        assert torch.backends.cuda.matmul.allow_tf32, "the caller's setting was not restored"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert len(seen.tf32_at_matmuls) >= 5 and not any(seen.tf32_at_matmuls), seen.tf32_at_matmuls


@pytest.mark.parametrize("tile", [(16, 32, 32, 3), (32, 16, 32, 1), (16, 16, 64, 8)], ids=str)
def test_other_tile_shapes(monkeypatch, tile):
    """Small tiles and odd groupings (as autotuning may pick on a GPU) cover many programs and uneven groups.
    (bf16: fp32 runs no NF4 matmul kernel.)"""
    block_m, block_n, block_k, group_m = tile
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m})
    monkeypatch.setattr(qlora_forward_kernel, "configs", [config])
    monkeypatch.setattr(qlora_grad_input_kernel, "configs", [config])
    g = seeded_generator(7)
    K, N, M, r = 128, 83, 71, 5
    weight = quantize_nf4(torch.randn(N, K, generator=g) * 0.05, 64, double_quant=True)
    layer = (torch.randn(M, K, generator=g).to(torch.bfloat16), weight, torch.randn(r, K, generator=g) / 11,
             torch.randn(N, r, generator=g), 2.0, torch.randn(N, generator=g))
    assert dispatch.kernel_path(M, torch.bfloat16) == "fused"
    check_against_float64(layer)


@pytest.mark.parametrize("x_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight_dtype", DTYPES, ids=str)
def test_weight_tiles_decode_exactly(weight_dtype, x_dtype):
    """x = I and B = 0 make y = W^T and (with dY = I) dX = W: the in-register decoding equals dequantize_nf4 exactly."""
    g = seeded_generator(3)
    N, K, r = 70, 192, 4
    weight = quantize_nf4((torch.randn(N, K, generator=g) * 0.05).to(weight_dtype), 64, double_quant=True)
    expected = dequantize_nf4(weight).to(x_dtype)
    eye_k = torch.eye(K, dtype=x_dtype, device=DEVICE).requires_grad_()
    lora_A = torch.randn(r, K, generator=g).to(DEVICE)
    y = fused_qlora_linear(eye_k, weight.to(DEVICE), lora_A, torch.zeros(N, r, device=DEVICE), 1.0)
    assert_equal(y.detach().cpu(), expected.t(), "x = I: y must be W^T exactly")
    y.backward(torch.eye(K, N, dtype=x_dtype, device=DEVICE))  # dY = I (K x N): dX = W padded with zero rows
    expected_grad = torch.cat([expected, torch.zeros(K - N, K, dtype=x_dtype)])
    assert_equal(eye_k.grad.cpu(), expected_grad, "dY = I: dX must be W exactly")


def test_only_requested_gradients_are_computed():
    """Frozen adapters or a frozen x get no gradient; the others are still right."""
    g = seeded_generator(5)
    weight = quantize_nf4(torch.randn(40, 64, generator=g), 32)
    x = torch.randn(9, 64, generator=g, device="cpu").to(DEVICE).requires_grad_()
    lora_A, lora_B = torch.randn(3, 64, generator=g).to(DEVICE), torch.randn(40, 3, generator=g).to(DEVICE).requires_grad_()
    fused_qlora_linear(x.detach(), weight.to(DEVICE), lora_A, lora_B, 2.0).sum().backward()
    assert lora_A.grad is None and lora_B.grad is not None
    fused_qlora_linear(x, weight.to(DEVICE), lora_A, lora_B.detach(), 2.0).sum().backward()
    reference_x = x.detach().clone().requires_grad_()
    qlora_linear(reference_x, weight.to(DEVICE), lora_A, lora_B.detach(), 2.0).sum().backward()
    torch.testing.assert_close(x.grad, reference_x.grad)


def test_empty_batch():
    weight = quantize_nf4(torch.randn(24, 64), 64).to(DEVICE)
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    lora_A = torch.randn(2, 64, device=DEVICE, requires_grad=True)
    y = fused_qlora_linear(x, weight, lora_A, torch.randn(24, 2, device=DEVICE), 2.0)
    assert y.shape == (0, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and torch.equal(lora_A.grad, torch.zeros_like(lora_A))


def test_rejects_what_the_kernels_cannot_do():
    weight = quantize_nf4(torch.randn(16, 96), 64)  # K = 96 is not a multiple of the blocksize
    x, lora_A, lora_B = torch.randn(3, 96), torch.randn(4, 96), torch.randn(16, 4)
    with pytest.raises(ValueError, match="multiple of the NF4 blocksize 64"):
        fused_qlora_linear(x, weight, lora_A, lora_B, 2.0)
    weight = quantize_nf4(torch.randn(16, 64), 64)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fused_qlora_linear(torch.randn(3, 64, dtype=torch.float64), weight, lora_A[:, :64], lora_B, 2.0)
    with pytest.raises(ValueError, match="lora_A"):
        fused_qlora_linear(torch.randn(3, 64), weight, torch.randn(0, 64), torch.randn(16, 0), 2.0)
    with pytest.raises(TypeError, match="scaling"):
        fused_qlora_linear(torch.randn(3, 64), weight, lora_A[:, :64], lora_B, torch.tensor(2.0))


@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels need a CUDA device")
def test_cpu_tensors_are_refused_on_a_gpu_machine():
    weight = quantize_nf4(torch.randn(16, 64), 64)
    with pytest.raises(ValueError, match="move them with .cuda"):
        fused_qlora_linear(torch.randn(3, 64), weight, torch.randn(4, 64), torch.randn(16, 4), 2.0)


@pytest.mark.skipif(DEVICE != "cuda" or not common.AUTOTUNE, reason="autotuning runs on a GPU (LORA_LAB_AUTOTUNE unset)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autotuned_kernels(dtype):
    """The autotuned path (several configs benchmarked) picks a config that respects the NF4 blocks and is correct."""
    g = seeded_generator(11)
    M, N, K, r = 300, 520, 1024, 16
    weight = quantize_nf4((torch.randn(N, K, generator=g) * 0.05).to(dtype), 128, double_quant=True)
    layer = (torch.randn(M, K, generator=g).to(dtype), weight, torch.randn(r, K, generator=g) / 32,
             torch.randn(N, r, generator=g) * 0.1, 2.0, torch.randn(N, generator=g).to(dtype))
    check_against_float64(layer)
    for kernel in (qlora_forward_kernel, qlora_grad_input_kernel):
        assert weight.blocksize % kernel.best_config.kwargs["BLOCK_K"] == 0


# ------------------------------------------------------------------------------------------- the module and training


def test_qlora_linear_module_with_triton_backend():
    """QLoRALinear(backend="triton") runs these kernels: the same output and gradients as calling them directly."""
    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(torch.nn.Linear(128, 45), r=8, alpha=16, backend="triton").to(DEVICE)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(45, 8, generator=seeded_generator(1)))
    x = torch.randn(2, 7, 128, generator=seeded_generator(2)).to(DEVICE)
    y = layer(x)
    y.square().sum().backward()
    lora_A, lora_B = (p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_B))
    direct = fused_qlora_linear(x, layer.weight, lora_A, lora_B, layer.scaling, layer.bias)
    direct.square().sum().backward()
    assert torch.equal(y, direct)
    assert torch.equal(layer.lora_A.grad, lora_A.grad) and torch.equal(layer.lora_B.grad, lora_B.grad)


def test_a_bf16_compute_dtype_layer_runs_the_kernels_in_bf16():
    """QLoRALinear(backend="triton", compute_dtype=bf16) on fp32 activations is the fused op on x cast to bf16, cast
    back: the --bf16 step on a GPU runs the kernels the suite checks in bf16, bit for bit, gradients included."""
    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(torch.nn.Linear(128, 45), r=8, alpha=16, backend="triton",
                                    compute_dtype=torch.bfloat16).to(DEVICE)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(45, 8, generator=seeded_generator(1)))
    x = torch.randn(2, 7, 128, generator=seeded_generator(2)).to(DEVICE).requires_grad_()
    y = layer(x)
    assert y.dtype == torch.float32
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    lora_A, lora_B = (p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_B))
    direct = fused_qlora_linear(x2.to(torch.bfloat16), layer.weight, lora_A, lora_B, layer.scaling, layer.bias).float()
    direct.square().sum().backward()
    assert torch.equal(y, direct) and torch.equal(x.grad, x2.grad)
    assert torch.equal(layer.lora_A.grad, lora_A.grad) and torch.equal(layer.lora_B.grad, lora_B.grad)


def _training_available() -> bool:
    return all(importlib.util.find_spec(f"lora_lab.{name}") is not None for name in ("model", "train"))


@pytest.mark.skipif(not _training_available(), reason="lora_lab.model / lora_lab.train not there yet")
def test_training_steps_match_the_reference_backend():
    """Three training steps of the tiny Llama: the same losses and adapters with backend="triton" as with the reference."""
    from lora_lab.model import apply_qlora, tiny_llama
    from lora_lab.train import training_step

    def train(backend: str) -> tuple[list[float], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = apply_qlora(tiny_llama(seed=0), r=8, alpha=16).to(DEVICE)
        for module in model.modules():
            if isinstance(module, QLoRALinear):
                module.backend = backend
        ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=seeded_generator(4)).to(DEVICE)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        # SGD, not AdamW: AdamW divides by |gradient|, which turns rounding noise in a near-zero gradient into a
        # full-size step, so it would compare optimizer noise rather than the kernels.
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        losses = [training_step(model, batch, optimizer) for _ in range(3)]
        return losses, {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}

    want_losses, want_params = train("reference")
    got_losses, got_params = train("triton")
    assert want_losses[-1] < want_losses[0], "the reference did not learn; the comparison would be meaningless"
    torch.testing.assert_close(got_losses, want_losses, rtol=1e-5, atol=0)
    for name, value in want_params.items():
        torch.testing.assert_close(got_params[name], value, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
