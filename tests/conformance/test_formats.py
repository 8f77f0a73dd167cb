"""Formats, capabilities and honest failures: the suite judges other storage fairly, and says why it does not.

Correct alternatives must pass (a suite that rejects valid code is as wrong as
one that accepts broken code); a library's own refusals and crashes must be
reported as what they are.
"""

import types

import pytest
import torch

from lora_lab.conformance.errors import CheckFailed
from lora_lab.conformance.isolation.target import Target
from lora_lab.conformance.judge.capabilities import declared, supported
from lora_lab.conformance.judge.formats import capabilities, unpack_codes
from lora_lab.conformance.runner import ERROR, FAILED, NOT_SUPPORTED, PASSED, all_checks, run_check
from lora_lab.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

CHECKS = {c.name: c for c in all_checks()}


class LowNibbleFirst:
    """A correct NF4 of another layout: element 2i in the LOW nibble, described as such by its own format."""

    name = "low nibble first"

    @staticmethod
    def quantize(weight, blocksize=64, double_quant=False):
        if weight.numel() % blocksize:
            assert False, f"numel {weight.numel()} must be a multiple of {blocksize}"  # noqa: B011 - a library's own assert
        q = quantize_nf4(weight, blocksize, double_quant)
        return NF4Tensor(((q.packed & 15) << 4) | (q.packed >> 4), q.absmax, q.blocksize, q.shape, q.dtype,
                         q.double_quant, q.absmax_code, q.absmax_scale, q.absmax_offset)

    @staticmethod
    def swapped(q):
        return NF4Tensor(((q.packed & 15) << 4) | (q.packed >> 4), q.absmax, q.blocksize, q.shape, q.dtype,
                         q.double_quant, q.absmax_code, q.absmax_scale, q.absmax_offset)

    @classmethod
    def dequantize(cls, q):
        return dequantize_nf4(cls.swapped(q))

    @classmethod
    def codes(cls, q):
        return unpack_codes(cls.swapped(q).packed, q.numel)

    @staticmethod
    def levels(q):
        from lora_lab.nf4 import NF4_CODE

        return NF4_CODE

    @staticmethod
    def absmax(q):
        return q.absmax_fp32()


def low_nibble_target() -> Target:
    fmt = LowNibbleFirst()
    module = types.ModuleType("low_nibble_first_format")

    def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
        y = x @ fmt.dequantize(weight).to(x.dtype).t() + scaling * (x @ lora_A.to(x.dtype).t()) @ lora_B.to(x.dtype).t()
        return y if bias is None else y + bias.to(x.dtype)

    module.NF4_FORMAT, module.quantize_nf4, module.dequantize_nf4 = fmt, fmt.quantize, fmt.dequantize
    module.qlora_linear = qlora_linear
    return Target("low_nibble_first_format", module)


def test_a_correct_format_of_another_layout_is_semantically_conformant():
    target = low_nibble_target()
    for name in ("nf4.round_trip_is_nearest_level", "nf4.zero_blocks_and_round_trip", "nf4.format_codes_and_levels",
                 "qlora.forward_matches_float64"):
        result = run_check(CHECKS[name], target)
        assert result.status == PASSED, f"{name}: {result.status} {result.detail}"
    interchange = run_check(CHECKS["nf4.bytes_match_bitsandbytes"], target)
    assert interchange.status == NOT_SUPPORTED and "semantic conformance only" in interchange.detail


def test_what_a_format_cannot_do_is_probed_and_recorded_with_the_librarys_reason():
    supports = capabilities(low_nibble_target())
    assert not supports.ragged and supports.blocksizes == (32, 64, 128, 256, 512, 1024, 2048, 4096)
    reason = supports.report()["not supported"]["ragged numel (numel % blocksize != 0)"]
    assert reason.startswith("not supported: AssertionError: numel 65 must be a multiple of 64")


def test_a_librarys_own_assert_is_an_error_with_its_traceback_and_the_drawn_input():
    module = types.ModuleType("asserting")

    def quantize_nf4(weight, blocksize=64, double_quant=False):
        if weight.numel() < 10**9:  # (pytest would rewrite a plain assert in this file; a library's is not rewritten)
            raise AssertionError("this library asserts on every weight")
        return quantize_nf4(weight, blocksize, double_quant)

    module.quantize_nf4, module.dequantize_nf4 = quantize_nf4, dequantize_nf4
    result = run_check(CHECKS["nf4.round_trip_is_nearest_level"], Target("asserting", module))
    assert result.status == ERROR
    assert "on the drawn input" in result.detail and "AssertionError: this library asserts on every weight" in result.detail
    assert "in quantize_nf4" in result.detail  # the library's own line, not the suite's


def test_bad_input_refused_by_any_clear_exception_passes_and_every_case_is_listed():
    module = types.ModuleType("runtime_errors")

    def quantize_nf4(weight, blocksize=64, double_quant=False):
        if not weight.is_floating_point() or weight.numel() == 0 or not torch.isfinite(weight).all():
            raise RuntimeError(f"cannot quantize this weight ({weight.dtype}, {weight.numel()} elements)")
        if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise AssertionError(f"blocksize {blocksize}")
        return quantize_nf4(weight, blocksize, double_quant)

    module.quantize_nf4 = quantize_nf4
    result = run_check(CHECKS["nf4.rejects_bad_input"], Target("runtime_errors", module))
    assert result.status == PASSED, result.detail
    assert "all 8 bad inputs refused" in result.detail and "the convention is ValueError or TypeError" in result.detail


def test_bad_input_that_returns_a_result_fails_and_lists_every_case():
    module = types.ModuleType("accepts_nan")
    module.quantize_nf4 = lambda weight, blocksize=64, double_quant=False: weight  # returns whatever it gets
    result = run_check(CHECKS["nf4.rejects_bad_input"], Target("accepts_nan", module))
    assert result.status == "failed" and "accepted 8 of 8 bad inputs" in result.detail
    assert "a weight holding NaN: returned a NaN result instead of raising" in result.detail


def test_a_format_probed_without_qlora_own_case_fails_instead_of_not_supported():
    """A library that cannot quantize blocks of 64 cannot run QLoRA: every check that draws from it fails, saying so."""
    target = low_nibble_target()
    quantize = target.obj.NF4_FORMAT.quantize

    def refuses_64(weight, blocksize=64, double_quant=False):
        if blocksize == 64:
            raise ValueError("blocks of 64 are not implemented")
        return quantize(weight, blocksize, double_quant)

    target.obj.NF4_FORMAT.quantize = target.obj.quantize_nf4 = refuses_64
    with pytest.raises(CheckFailed, match="supports blocksizes .*ValueError: blocks of 64 are not implemented.*QLoRA's own case"):
        capabilities(target)
    result = run_check(CHECKS["nf4.round_trip_is_nearest_level"], target)
    assert result.status == FAILED and "QLoRA's own case" in result.detail


def test_capabilities_count_for_nothing_on_a_target_that_speaks_nf4tensor():
    """Declaring away the blocksize it gets wrong must not turn an NF4Tensor target's failure into "not supported"."""
    module = types.ModuleType("wrong_at_128")

    def wrong_at_128(weight, blocksize=64, double_quant=False):
        q = quantize_nf4(weight, blocksize, double_quant)
        return NF4Tensor(q.packed ^ 1, q.absmax, q.blocksize, q.shape, q.dtype, q.double_quant, q.absmax_code,
                         q.absmax_scale, q.absmax_offset) if blocksize == 128 else q

    module.quantize_nf4, module.dequantize_nf4 = wrong_at_128, dequantize_nf4
    module.CAPABILITIES = {"blocksizes": ((32, 64, 256, 512, 1024, 2048, 4096), "128 is not tuned yet")}
    target = Target("wrong_at_128", module)
    assert declared(target, "blocksizes") is None and supported(target, "blocksizes", (64, 128)) == [64, 128]
    result = run_check(CHECKS["nf4.bytes_match_bitsandbytes"], target)
    assert result.status == FAILED and "blocksize=128" in result.detail.replace(" ", ""), result.detail
