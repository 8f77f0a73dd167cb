"""The out-of-bounds watch itself: it sees every launch, names the argument and the side, and stops a stray store.

A watch that silently watched nothing would let every unmasked kernel pass, so the
first test pins that it really is active on lora_lab's own kernels.
"""

import os

import pytest
import torch

from lora_lab.conformance.judge.bounds import OutOfBounds, guarded, guards_changed, watch_memory
from lora_lab.nf4 import quantize_nf4

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the watch works under Triton's interpreter (CPU)")
os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _shifted_copy(src_ptr, dst_ptr, n, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    values = tl.load(src_ptr + offs + SHIFT, mask=offs < n)  # reads SHIFT elements off the end (or the start)
    tl.store(dst_ptr + offs, values, mask=offs < n)


@triton.jit
def _unmasked_store(dst_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, tl.zeros((BLOCK,), dtype=tl.float32))


def test_the_watch_sees_lora_labs_kernels_and_finds_nothing_wrong():
    from lora_lab.kernels import nf4_dequantize

    q = quantize_nf4(torch.randn(3, 97), 32, double_quant=True)
    with watch_memory() as log:
        nf4_dequantize(q)
    assert log.active and log.launches >= 1 and not log.accesses


@pytest.mark.parametrize("shift, side", [(3, "past the end"), (-2, "before the start")])
def test_a_stray_read_names_the_argument_and_the_side(shift, side):
    src, dst = guarded(torch.arange(8.0)), torch.empty(8)
    with watch_memory() as log, pytest.raises(OutOfBounds):
        _shifted_copy[(1,)](src, dst, 8, SHIFT=shift, BLOCK=8)
    (access,) = log.accesses
    assert (access.kind, access.argument, access.side, access.elements) == ("load", "src_ptr", side, abs(shift))


def test_a_stray_store_is_stopped_before_it_writes():
    dst = guarded(torch.ones(10))
    with watch_memory() as log, pytest.raises(OutOfBounds):
        _unmasked_store[(1,)](dst, BLOCK=16)
    assert log.accesses[0].describe() == "kernel _unmasked_store wrote 6 element(s) past the end of dst_ptr"
    assert guards_changed(dst) is None and torch.equal(dst, torch.ones(10)), "nothing may be written at all"


def test_the_guard_layer_alone_sees_a_write_past_the_end():
    dst = guarded(torch.ones(10))
    dst._base[1024 + 10] = 0.0  # what an unwatched kernel's stray store leaves behind
    assert guards_changed(dst) == "past the end"


@triton.jit
def _store_with_dummy_bias(bias_ptr, y_ptr, n, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    values = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_BIAS:
        values += tl.load(bias_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, values, mask=offs < n + 2)  # the mask lets two lanes past the end of y


@pytest.mark.parametrize("has_bias", [False, True])
def test_a_stray_store_names_the_pointer_it_went_through_when_a_tensor_is_passed_twice(has_bias):
    """y passed again as the dummy bias pointer (as exercise 08 allows, bias_ptr before y_ptr as there): the store went
    through y_ptr, and says so, although bias_ptr comes first and holds the same tensor."""
    y = guarded(torch.ones(10))
    with watch_memory() as log, pytest.raises(OutOfBounds):
        _store_with_dummy_bias[(1,)](y, y, 10, HAS_BIAS=has_bias, BLOCK=16)
    (access,) = log.accesses
    assert (access.kind, access.argument, access.aliases, access.traced) == ("store", "y_ptr", ("bias_ptr",), True)
    assert access.describe() == ("kernel _store_with_dummy_bias wrote 2 element(s) past the end of y_ptr (through "
                                 "y_ptr; the same tensor is also passed as bias_ptr)")


@triton.jit
def _load_through_the_second_alias(first_ptr, second_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(second_ptr + offs + 1))  # one element past the end, read through second_ptr


def test_a_stray_load_names_the_second_alias_when_it_went_through_that_one():
    x, out = guarded(torch.ones(8)), torch.empty(8)
    with watch_memory() as log, pytest.raises(OutOfBounds):
        _load_through_the_second_alias[(1,)](x, x, out, BLOCK=8)
    (access,) = log.accesses
    assert (access.kind, access.argument, access.aliases) == ("load", "second_ptr", ("first_ptr",))
