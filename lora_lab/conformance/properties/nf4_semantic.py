"""Semantic properties of NF4 (exercise 01): NF4 as defined, checked on the numbers of any storage format.

A library need not store bitsandbytes' bytes to implement NF4 correctly. These
checks hold a weight to the definition of NF4 alone, through the target's
quantize and dequantize (its own format's, see ``lora_lab.conformance.judge.formats``):

- a round trip lands each element on the level nearest to it over its block's
  absmax (a tie within rounding may go either way), times that absmax;
- a round trip moves a value by at most half a level gap times its absmax, and a
  block of zeros comes back as zeros;
- for a library's own format, the numbers a kernel reads are NF4's: 16 levels
  equal to NF4's, each code the nearest of them, dequantize = level x stored
  absmax in the weight's shape and dtype. (An NF4Tensor's numbers are its bytes:
  the interchange checks compare them with bitsandbytes' bit for bit.)

Only what the format supports is drawn (see ``formats.capabilities``).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_lab.conformance.errors import CheckFailed
from lora_lab.conformance.judge.compare import UNIT_ROUNDOFF, assert_close, call_guarded
from lora_lab.conformance.judge.formats import capabilities, has_own_format, weight_format
from lora_lab.conformance.judge.profiles import examples
from lora_lab.conformance.properties.nf4 import check_fields, supported_weights, with_witnesses
from lora_lab.conformance.registry import SEMANTIC, check
from lora_lab.nf4 import NF4_CODE

NF4_LEVELS = NF4_CODE.double()  # the standard levels: bitsandbytes' fp32 table, the QLoRA paper's values
U32 = UNIT_ROUNDOFF[torch.float32]


def _exact_absmax(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Each element's block absmax, exactly (float64 of the weight's own values), and the padded block count."""
    flat = weight.reshape(-1).double()
    blocks = -(-flat.numel() // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - flat.numel()))
    return padded.view(blocks, blocksize).abs().amax(1).repeat_interleave(blocksize)[: flat.numel()]


def _draw(target, drawn, double_quant):
    """The drawn weight quantized through the target's format: (weight, blocksize, double_quant, q, where)."""
    weight, blocksize = drawn
    supports = capabilities(target)
    double_quant = double_quant if double_quant in supports.double_quant else supports.double_quant[0]
    q = call_guarded(weight_format(target).quantize, weight, blocksize, double_quant, name="quantize_nf4")
    if not has_own_format(target):  # an NF4Tensor's readers trust one absmax per block, and the rest of its fields
        check_fields(q, weight.numel(), blocksize, double_quant)
    where = f"blocksize={blocksize}, double_quant={double_quant}, dtype={weight.dtype}, shape={tuple(weight.shape)}"
    return weight, blocksize, double_quant, q, where


def _codes(fmt, q, numel: int) -> torch.Tensor:
    codes = fmt.codes(q)
    if not isinstance(codes, torch.Tensor) or codes.numel() != numel or codes.is_floating_point():
        raise CheckFailed(f"the format's codes(q) must be an integer tensor of {numel} level indices")
    codes = codes.reshape(-1).long()
    if codes.min() < 0 or codes.max() > 15:
        raise CheckFailed(f"codes must index 16 levels; got values from {int(codes.min())} to {int(codes.max())}")
    return codes


def _absmax_error(absmax: torch.Tensor, double_quant: bool) -> torch.Tensor | float:
    """How far a stored absmax may be from the exact one: double quantization stores it to within ~1/127 of the
    centred range (half the dynamic map's widest gap times the scale of 256 blocks); without it, exactly."""
    return (absmax.max() - absmax.min()) / 127 if double_quant else 0.0


@check(
    "nf4.round_trip_is_nearest_level",
    requires=("quantize_nf4", "dequantize_nf4"),
    points=3,
    exercise="01",
    level=SEMANTIC,
    hint="Divide each element by its block's absmax (the largest magnitude among the blocksize consecutive elements "
    "it belongs to), pick the closest of the 16 levels, and dequantize to that level times the absmax. An all-zero "
    "block has nothing to divide: it must come back as zeros.",
)
def round_trip_is_nearest_level(target) -> None:
    """dequantize(quantize(w)) is, element by element, the NF4 level nearest to w / absmax, times that absmax."""
    fmt = weight_format(target)

    @settings(max_examples=examples(20))
    @given(supported_weights(capabilities(target)), st.booleans())
    @lambda prop: with_witnesses(prop, capabilities(target))
    def prop(drawn, double_quant):
        weight, blocksize, double_quant, q, where = _draw(target, drawn, double_quant)
        back = call_guarded(fmt.dequantize, q, name="dequantize_nf4").reshape(-1).double()
        absmax = _exact_absmax(weight, blocksize)
        scaled = torch.where(absmax > 0, weight.reshape(-1).double() / absmax.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
        distance = (scaled[:, None] - NF4_LEVELS[None, :]).abs()
        u = UNIT_ROUNDOFF[weight.dtype]
        # A library may divide in the weight's dtype: the scaled value is then off by u|x|, which can carry it across
        # a midpoint. So the second-nearest level is accepted where it is within twice that of the nearest.
        two = distance.topk(2, dim=1, largest=False)
        tie = two.values[:, 1] - two.values[:, 0] <= 2 * u * scaled.abs() + 4 * U32
        absmax_error = _absmax_error(absmax, double_quant)
        best = torch.full_like(back, float("inf"))
        for k, accepted in ((0, torch.ones_like(tie)), (1, tie)):
            level = NF4_LEVELS[two.indices[:, k]]
            # The stored absmax a' (within absmax_error), the level kept in the dtype, the product rounded to it.
            allowed = level.abs() * absmax_error + (2 * u + U32) * (level * absmax).abs() + torch.finfo(weight.dtype).tiny
            excess = torch.where(accepted, (back - level * absmax).abs() - allowed, float("inf"))
            best = torch.minimum(best, excess)
        if (best > 0).any():
            i = int(best.argmax())
            raise CheckFailed(
                f"round trip ({where}): {int((best > 0).sum())} of {weight.numel()} elements are not the nearest NF4 level "
                f"times their block's absmax; element {i} is {weight.reshape(-1)[i].item():.7g} in a block of absmax "
                f"{absmax[i].item():.7g}: nearest level {NF4_LEVELS[two.indices[i, 0]].item():.7g}, so "
                f"{(NF4_LEVELS[two.indices[i, 0]] * absmax[i]).item():.7g} was expected; it came back as {back[i].item():.7g}"
            )

    prop()


@check(
    "nf4.format_codes_and_levels",
    requires=("quantize_nf4", "dequantize_nf4", "NF4_FORMAT"),
    points=0,
    exercise="",
    level=SEMANTIC,
    hint="A library's own format must hold what NF4 defines: 16 levels equal to NF4's (to the digits of the dtype), "
    "each code the nearest of them, and dequantize exactly level times the stored absmax, in the weight's shape and dtype.",
)
def format_codes_and_levels(target) -> None:
    """The format's own numbers (codes, levels, absmax) are NF4's, and its dequantize is level x absmax in shape and dtype."""
    fmt = weight_format(target)

    @settings(max_examples=examples(20))
    @given(supported_weights(capabilities(target)), st.booleans())
    @lambda prop: with_witnesses(prop, capabilities(target))
    def prop(drawn, double_quant):
        weight, blocksize, double_quant, q, where = _draw(target, drawn, double_quant)
        back = call_guarded(fmt.dequantize, q, name="dequantize_nf4")
        if not isinstance(back, torch.Tensor) or tuple(back.shape) != tuple(weight.shape) or back.dtype != weight.dtype:
            got = f"{tuple(back.shape)} {back.dtype}" if isinstance(back, torch.Tensor) else type(back).__name__
            raise CheckFailed(f"dequantize ({where}) must return the weight's shape and dtype, "
                              f"{tuple(weight.shape)} {weight.dtype}; got {got}")
        u = UNIT_ROUNDOFF[weight.dtype]
        levels = torch.as_tensor(fmt.levels(q)).double().reshape(-1)
        if levels.numel() != 16:
            raise CheckFailed(f"the format's levels(q) must hold 16 levels, got {levels.numel()}")
        off = (levels - NF4_LEVELS).abs()
        if (off > u * NF4_LEVELS.abs()).any():  # a level kept in the weight's dtype is rounded once, no more
            worst = int((off - u * NF4_LEVELS.abs()).argmax())
            raise CheckFailed(f"the format's 16 levels are not NF4's ({where}): level {worst} is {levels[worst].item():.8g}, "
                              f"NF4's is {NF4_LEVELS[worst].item():.8g} (off by {off[worst].item():.2g}; the dtype's "
                              f"rounding allows {u * NF4_LEVELS[worst].abs().item():.2g})")
        codes = _codes(fmt, q, weight.numel())
        absmax = _exact_absmax(weight, blocksize)
        scaled = torch.where(absmax > 0, weight.reshape(-1).double() / absmax.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
        distance = (scaled[:, None] - levels[None, :]).abs()
        excess = distance.gather(1, codes[:, None]).squeeze(1) - distance.min(1).values - 2 * u * scaled.abs() - 4 * U32
        if (excess > 0).any():
            i = int(excess.argmax())
            raise CheckFailed(f"codes ({where}): {int((excess > 0).sum())} of {weight.numel()} are not the nearest level; "
                              f"element {i} is {weight.reshape(-1)[i].item():.7g} in a block of absmax {absmax[i].item():.7g}: "
                              f"code {int(codes[i])} (level {levels[codes[i]].item():.7g}), nearest is level "
                              f"{levels[distance[i].argmin()].item():.7g}")
        stored = torch.as_tensor(fmt.absmax(q)).double().reshape(-1)
        expected = levels[codes] * stored.repeat_interleave(blocksize)[: weight.numel()]
        allowed = (u + U32) * expected.abs() + torch.finfo(weight.dtype).tiny  # the product in fp32, one rounding to the dtype
        assert_close(back.reshape(-1), expected, allowed, f"dequantized value vs level x stored absmax ({where})")

    prop()


@check(
    "nf4.zero_blocks_and_round_trip",
    requires=("quantize_nf4", "dequantize_nf4"),
    points=6,
    exercise="01",
    level=SEMANTIC,
    hint="A block of zeros has absmax 0: never divide by it (bitsandbytes floors it at 1e-38). "
    "Each value may move by at most half the widest gap between neighbouring NF4 levels, times its absmax.",
)
def zero_blocks_and_round_trip(target) -> None:
    """All-zero blocks come back as zeros (never NaN); every value is within absmax x half the widest NF4 gap.

    Draws ``strategies.nf4_weights``: all-zero blocks anywhere, a full or short all-zero last block, outliers.
    """
    fmt = weight_format(target)
    half_gap = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()) / 2

    @settings(max_examples=examples(20))
    @given(supported_weights(capabilities(target)), st.booleans())
    @lambda prop: with_witnesses(prop, capabilities(target))
    def prop(drawn, double_quant):
        weight, blocksize, double_quant, q, where = _draw(target, drawn, double_quant)
        back = call_guarded(fmt.dequantize, q, name="dequantize_nf4").reshape(-1).double()
        flat = weight.reshape(-1).double()
        absmax = _exact_absmax(weight, blocksize)
        # |w - round(level * a')| <= a * half_gap + |level| * |a - a'| + u * |result|: the nearest level, the stored
        # absmax a' (|level| <= 1), then one rounding to the dtype.
        absmax_error = _absmax_error(absmax, double_quant)
        allowed = absmax * half_gap + absmax_error + UNIT_ROUNDOFF[weight.dtype] * back.abs() + torch.finfo(weight.dtype).tiny
        zeros = absmax == 0
        if zeros.any() and back[zeros].abs().max() != 0:
            i = int((back.abs() * zeros).argmax())
            raise CheckFailed(f"an all-zero block did not dequantize to zeros ({where}): element {i} of a block whose "
                              f"every value is 0 came back as {back[i].item():.7g}")
        assert_close(back, flat, allowed, f"round-trip error ({where})")

    prop()
