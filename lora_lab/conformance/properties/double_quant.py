"""Properties of double quantization (exercise 02), each part with its own points, checked against bitsandbytes.

Double quantization has four parts a learner can get wrong independently: the
offset (the fp32 mean of every absmax), the fp32 scale of each group of 256
blocks, the uint8 codes, and the 65,536-entry nearest-level table that turns a
normalized value into a code. One all-or-nothing check told a learner only that
*something* was wrong; here each part is its own check, so the table says which.
"""

from __future__ import annotations

import functools

import torch
from hypothesis import given, settings

from lora_lab.conformance.errors import CheckFailed
from lora_lab.conformance.judge.compare import assert_equal, call_guarded, seeded_generator
from lora_lab.conformance.judge.formats import has_own_format, interchange_capabilities, to_interchange
from lora_lab.conformance.judge.profiles import examples
from lora_lab.conformance.judge.strategies import double_quant_weights, grid_boundary_values
from lora_lab.conformance.properties.nf4 import check_fields
from lora_lab.conformance.registry import INTERCHANGE, check
from lora_lab.nf4 import ABSMAX_BLOCKSIZE
from lora_lab.targets.libraries import bitsandbytes


def _bnb_double_quantize(weight: torch.Tensor, blocksize: int):
    return bitsandbytes().functional.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=True)


def _double_quantize(target, weight: torch.Tensor, blocksize: int):
    """The target's double-quantized NF4Tensor; a format of its own is converted (NotSupported if it cannot be)."""
    interchange_capabilities(target)
    q = call_guarded(target.op("quantize_nf4"), weight, blocksize, True, name="quantize_nf4")
    if has_own_format(target):
        q = to_interchange(target, q)
    for field in ("packed", "absmax", "double_quant", "absmax_code", "absmax_scale", "absmax_offset"):
        if not hasattr(q, field):
            raise CheckFailed(f"quantize_nf4(..., double_quant=True) must return an NF4Tensor-like object with {field!r}")
    if not q.double_quant:
        raise CheckFailed("quantize_nf4(..., double_quant=True) returned an NF4Tensor with double_quant=False")
    check_fields(q, weight.numel(), blocksize, True)
    return q


def _where(weight: torch.Tensor, blocksize: int) -> str:
    blocks = -(-weight.numel() // blocksize)
    groups = -(-blocks // ABSMAX_BLOCKSIZE)
    return f"blocksize={blocksize}, {blocks} blocks in {groups} group(s) of {ABSMAX_BLOCKSIZE}, {weight.dtype}"


@check(
    "nf4.double_quant_offset",
    requires=("quantize_nf4",),
    level=INTERCHANGE,
    points=2,
    exercise="02",
    hint="The offset is one number for the whole weight: the mean of every block's absmax, computed in fp32 the way "
    "torch's absmax.mean() does (not in float64, not one mean per group of 256).",
)
def double_quant_offset(target) -> None:
    """The offset equals bitsandbytes': the fp32 mean of all absmax values.

    Draws ``strategies.double_quant_weights``: several groups with different levels and a single-outlier block
    (where the fp32 and float64 means differ).
    """

    @settings(max_examples=examples(20))
    @given(double_quant_weights())
    def prop(drawn):
        weight, blocksize = drawn
        q = _double_quantize(target, weight, blocksize)
        _, state = _bnb_double_quantize(weight, blocksize)
        offset = q.absmax_offset
        if isinstance(offset, torch.Tensor):
            offset = offset.reshape(-1)[0].item() if offset.numel() == 1 else offset
        if not isinstance(offset, float):
            raise CheckFailed(f"absmax_offset must be one Python float, got {type(offset).__name__}")
        want = float(state.offset)
        if offset != want:
            raise CheckFailed(f"absmax offset ({_where(weight, blocksize)}): expected {want!r} (fp32 mean of all absmax), "
                              f"got {offset!r}")

    prop()


@check(
    "nf4.double_quant_scales",
    requires=("quantize_nf4",),
    level=INTERCHANGE,
    points=2,
    exercise="02",
    hint="One fp32 scale per group of 256 consecutive blocks (the last group may be short): the largest |absmax - "
    "offset| within that group, with the one global offset. A weight of more than 256 blocks has several.",
)
def double_quant_scales(target) -> None:
    """The fp32 scales equal bitsandbytes': one per group of 256 blocks, the max of the centred absmax in the group.

    Draws ``strategies.double_quant_weights``: 1 to 4 groups with their own statistics, a short last group.
    """

    @settings(max_examples=examples(20))
    @given(double_quant_weights())
    def prop(drawn):
        weight, blocksize = drawn
        q = _double_quantize(target, weight, blocksize)
        _, state = _bnb_double_quantize(weight, blocksize)
        assert_equal(torch.as_tensor(q.absmax_scale).reshape(-1), state.state2.absmax,
                     f"fp32 scale per group of {ABSMAX_BLOCKSIZE} blocks ({_where(weight, blocksize)})")

    prop()


@check(
    "nf4.double_quant_codes",
    requires=("quantize_nf4",),
    level=INTERCHANGE,
    points=3,
    exercise="02",
    hint="Centre every absmax on the one global offset, multiply by 1 / (its group's scale), snap to bitsandbytes' "
    "65,536-point grid, then look up the nearest map entry; an all-equal group (scale 0) stores code 0.",
)
def double_quant_codes(target) -> None:
    """The uint8 absmax codes, the packed bytes and the 8-bit dynamic map equal bitsandbytes'.

    Draws ``strategies.double_quant_weights``: groups with different statistics, values a fraction of a grid cell
    from the dynamic map's midpoints, equal absmax values, outliers.
    """

    @settings(max_examples=examples(20))
    @given(double_quant_weights())
    def prop(drawn):
        weight, blocksize = drawn
        q = _double_quantize(target, weight, blocksize)
        packed, state = _bnb_double_quantize(weight, blocksize)
        where = _where(weight, blocksize)
        assert_equal(q.absmax_code.float(), state.state2.code, "the 8-bit dynamic map")
        assert_equal(q.absmax.reshape(-1), state.absmax, f"uint8 absmax codes ({where})")
        assert_equal(q.packed.reshape(-1), packed.reshape(-1), f"packed bytes ({where})")

    prop()


@functools.cache
def every_grid_point_weight(blocksize: int = 32) -> torch.Tensor:
    """A weight whose centred, normalized absmax values land in the middle of each of the 65,536 grid cells, and
    then a fraction of a cell from every midpoint between map levels (where skipping the grid changes the code).

    Every group of 256 blocks is symmetric around the offset 1.0 (+c and -c) with scale 0.5 (a power of two, so
    normalizing is exact up to the rounding of 1 + c, far smaller than a cell), so each entry of the table is
    looked up once. Each block is its absmax followed by zeros.
    """
    cells = torch.arange(32768, 65536, dtype=torch.float64)
    positive = (cells / 65535 * 2 - 1).clamp(max=1.0)  # grid points in [0, 1]; their negatives cover [-1, 0]
    boundary = grid_boundary_values(seeded_generator(0)).double()
    positive = torch.cat([positive, boundary.abs(), -boundary.abs()])  # each pair below adds the negated value
    per_group = ABSMAX_BLOCKSIZE // 2 - 1
    groups = []
    for start in range(0, positive.numel(), per_group):
        half = torch.cat([torch.ones(1, dtype=torch.float64), positive[start : start + per_group]])
        groups.append(torch.cat([half, -half]))
    centred = torch.cat(groups)
    absmax = (1.0 + 0.5 * centred).float()
    weight = torch.zeros(absmax.numel(), blocksize)
    weight[:, 0] = absmax
    return weight.reshape(-1)


@check(
    "nf4.double_quant_grid_table",
    requires=("quantize_nf4",),
    level=INTERCHANGE,
    points=3,
    exercise="02",
    hint="nearest_level_table: entry i is the index of the map level nearest to grid point i / 65535.0 * 2 - 1, "
    "computed in fp32 in that order, the lower index on a tie; a value is looked up by grid index "
    "int(((v + 1) * 0.5) * 65535 + 0.5), never by searching the map for v itself.",
)
def double_quant_grid_table(target) -> None:
    """Absmax values in each of the 65,536 grid cells get bitsandbytes' codes: the nearest-level table is right.

    Draws nothing: one constructed weight (``every_grid_point_weight``) visits every entry of the table and every
    place where a direct nearest-level search would disagree with the grid.
    """
    weight = every_grid_point_weight()
    q = _double_quantize(target, weight, 32)
    _, state = _bnb_double_quantize(weight, 32)
    got, want = torch.as_tensor(q.absmax).reshape(-1), state.absmax
    if got.shape != want.shape or got.dtype != want.dtype:
        assert_equal(got, want, "uint8 absmax codes")
    wrong = (got != want).nonzero().reshape(-1)
    if wrong.numel():
        i = int(wrong[0])
        normalized = (weight.reshape(-1, 32)[i, 0].double() - 1.0) / 0.5
        grid = int(((normalized.clamp(-1, 1) + 1) * 0.5 * 65535 + 0.5).item())
        raise CheckFailed(
            f"uint8 absmax codes: {wrong.numel()} of {want.numel()} constructed values get the wrong level; first: normalized "
            f"value {normalized.item():.9g} (grid point {grid}) expected code {int(want[i])}, got {int(got[i])}"
        )
