"""Inputs that find the bugs: hypothesis strategies that *construct* the hard cases instead of hoping for them.

Random normal weights almost never land on an NF4 midpoint, never hold more than
256 blocks with different statistics, and never put a tie exactly where a
one-ulp rounding difference flips a code. The mistakes the exercises warn about
live exactly there, so each strategy below builds those inputs on purpose:

- ``MIDPOINTS``: a block holding the 15 fp32 midpoints between NF4 levels (and
  their one-ulp neighbours), with absmax a power of two so each lands exactly.
  bitsandbytes picks the *lower* level on an exact midpoint; the fp32 midpoints
  differ from the float64 ones for 9 of the 15, so comparing in float64 flips codes.
- ``MULTIPLY_VS_DIVIDE``: absmax 0.49308836 with x = -0.06800267. ``x * (1/a)``
  (bitsandbytes, full blocks) gives code 6, ``x / a`` (bitsandbytes, the short
  last block) gives code 5. Placed in a full block and in a short last block.
- ``ALL_EQUAL``, ``OUTLIER``, ``ZERO``: blocks of one repeated value, of small
  values with one large outlier, of zeros; the last block full or short, and
  all-zero in either case (bitsandbytes stores 1e-38 only for a *short* zero block).
- ``double_quant_weights``: more than 256 blocks, each group of 256 with its own
  statistics (scale and level), a single-outlier block (which makes the fp32
  mean differ from the float64 one), and a group whose absmax values sit around
  the midpoints between dynamic-map levels, a fraction of a grid cell away: there
  the 65,536-point grid and a direct nearest-level search disagree.

Each witness was checked against bitsandbytes itself (tests/conformance/test_strategies.py
keeps that check), never against lora_lab's own quantizer.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from lora_lab.conformance.judge.compare import add_outliers, seeded_generator
from lora_lab.nf4 import ABSMAX_BLOCKSIZE, FLOAT_DTYPES, NF4_CODE, VALID_BLOCKSIZES, dynamic_map

BLOCKSIZES, DTYPES = VALID_BLOCKSIZES, FLOAT_DTYPES  # what the NF4 contract covers (lora_lab.nf4)
WITNESS_ABSMAX, WITNESS_VALUE = 0.49308836, -0.06800267  # x * (1/a) and x / a fall on two sides of an NF4 midpoint

RANDOM, MIDPOINTS, MULTIPLY_VS_DIVIDE, ALL_EQUAL, OUTLIER, ZERO = (
    "random", "midpoints", "multiply_vs_divide", "all_equal", "outlier", "zero")
BLOCK_KINDS = (RANDOM, MIDPOINTS, MULTIPLY_VS_DIVIDE, ALL_EQUAL, OUTLIER, ZERO)


def nf4_midpoints() -> torch.Tensor:
    """The 15 midpoints between neighbouring NF4 levels, computed in fp32 as bitsandbytes does."""
    return (NF4_CODE[:-1] + NF4_CODE[1:]) / 2


def _midpoint_values() -> torch.Tensor:
    """Each fp32 midpoint and its neighbours one ulp below and above, plus +-1.0 (the absmax)."""
    mid = nf4_midpoints()
    below, above = torch.nextafter(mid, torch.tensor(-2.0)), torch.nextafter(mid, torch.tensor(2.0))
    return torch.cat([torch.tensor([1.0]), mid, below, above, -mid.flip(0), torch.tensor([-1.0])])


def block_values(kind: str, length: int, g: torch.Generator, scale: float) -> torch.Tensor:
    """``length`` fp32 values of one block of ``kind``; ``scale`` is a power of two so that witnesses stay exact."""
    if kind == ZERO:
        return torch.zeros(length)
    if kind == ALL_EQUAL:
        return torch.full((length,), scale * 0.75) * torch.where(torch.rand(length, generator=g) < 0.5, -1.0, 1.0)
    if kind == OUTLIER:
        values = torch.randn(length, generator=g) * scale * 1e-3
        values[int(torch.randint(0, length, (1,), generator=g))] = scale * 40
        return values
    if kind == MIDPOINTS:  # 1.0 first (the absmax), then the midpoints and their neighbours from a drawn start
        pattern = _midpoint_values()[1:]
        pattern = pattern.roll(int(torch.randint(0, pattern.numel(), (1,), generator=g)))
        pattern = torch.cat([torch.tensor([1.0]), pattern.repeat(-(-length // pattern.numel()))])
        return pattern[:length] * scale
    if kind == MULTIPLY_VS_DIVIDE:
        values = torch.rand(length, generator=g) * (2 * WITNESS_ABSMAX) - WITNESS_ABSMAX
        values[0] = WITNESS_ABSMAX
        values[1 % length] = WITNESS_VALUE if length > 1 else WITNESS_ABSMAX
        return values
    return torch.randn(length, generator=g) * scale


def nf4_witnesses() -> list[tuple[torch.Tensor, int]]:
    """The constructed cases every NF4 check runs first (as hypothesis ``@example``s), each in fp32, blocksize 64.

    A block of the midpoints; the multiply-vs-divide witness in a full block and in a short last block; a full and
    a short all-zero last block; an all-equal block and a single-outlier block between random ones.
    """
    g = seeded_generator(0)
    random = lambda n=64: torch.randn(n, generator=g)  # noqa: E731
    witness = lambda n: block_values(MULTIPLY_VS_DIVIDE, n, g, 1.0)  # noqa: E731
    cases = [
        torch.cat([block_values(MIDPOINTS, 64, g, 1.0), block_values(MIDPOINTS, 62, g, 0.25)]),
        torch.cat([witness(64), random()]),
        torch.cat([random(), witness(40)]),
        torch.cat([random(), torch.zeros(64)]),
        torch.cat([random(), torch.zeros(30)]),
        torch.cat([random(), block_values(ALL_EQUAL, 64, g, 1.0), block_values(OUTLIER, 64, g, 1.0), random(9)]),
    ]
    return [(case, 64) for case in cases]


def subnormal_absmax_witness() -> tuple[torch.Tensor, int]:
    """A random block, then one whose absmax (1e-39) is an fp32 subnormal, in fp32, blocksize 64.

    bitsandbytes floors the divisor at 1e-38, so the small values keep codes near 0.0 (byte 0x86 among them);
    1 / absmax itself overflows to Inf, and a quantizer that repairs that with nan_to_num stores codes 0 and 15.
    """
    g = seeded_generator(1)
    small = torch.rand(64, generator=g) * 2 - 1
    small = small / small.abs().max() * 1e-39
    return torch.cat([torch.randn(64, generator=g), small]), 64


def many_groups_witness() -> tuple[torch.Tensor, int]:
    """Three groups of 256 blocks of 32 (the last one short), each at its own level: a double-quantized weight whose
    three absmax scales differ, for a dequantizer that decodes double quantization itself (one scale for every
    block is wrong from block 256 on). 19,200 fp32 elements: cheap even under Triton's interpreter."""
    g = seeded_generator(2)
    levels = torch.tensor([0.02, 1.0, 7.0]).repeat_interleave(ABSMAX_BLOCKSIZE)[: 600]
    return (torch.randn(600, 32, generator=g) * levels[:, None]).reshape(-1), 32


@st.composite
def nf4_weights(draw, max_numel: int = 6000, dtypes: tuple[torch.dtype, ...] = DTYPES,
                blocksizes: tuple[int, ...] = BLOCKSIZES, ragged: bool = True):
    """``(weight, blocksize)``: random blocks mixed with constructed ones, a full or short last block.

    Draws: exact NF4 midpoints and their one-ulp neighbours, the multiply-vs-divide witness in a full block and in
    a short last block, all-equal, single-outlier and all-zero blocks (a full or a short all-zero last block),
    odd shapes (1-D or a few rows), every blocksize from 32 to 4096, fp32/fp16/bf16, and in a quarter of the draws
    one outlier of ``compare.OUTLIER_MAGNITUDE`` (in bf16 past fp16's largest number). A format that supports
    only some ``blocksizes``, or no short last block (``ragged=False``), gets only those (``formats.capabilities``).
    """
    blocksize = draw(st.sampled_from(blocksizes))
    full_blocks = draw(st.integers(0 if ragged else 1, max(0 if ragged else 1, max_numel // blocksize - 1)))
    tail = draw(st.sampled_from((0, 2, 3, blocksize // 2 + 1, blocksize - 1, 1))) if ragged else 0
    if full_blocks == 0 and tail == 0:
        tail = draw(st.integers(1, blocksize))
    # The last block (full or short) is drawn on its own, witnesses first: a short block divides, a full one
    # multiplies, and only a short all-zero one stores 1e-38. The others mix every kind.
    last = draw(st.sampled_from((MULTIPLY_VS_DIVIDE, ZERO, MIDPOINTS, RANDOM, OUTLIER, ALL_EQUAL)))
    others = full_blocks + (tail > 0) - 1
    kinds = draw(st.lists(st.sampled_from(BLOCK_KINDS), min_size=others, max_size=others)) + [last]
    # Constructed blocks are exact in fp32; in fp16/bf16 the values round, so most draws of those stay random.
    dtype = draw(st.sampled_from(dtypes[:1] * 2 + dtypes[1:]))  # fp32 half the time: the witnesses are exact there
    scale = 2.0 ** draw(st.integers(-8, 5))
    g = seeded_generator(draw(st.integers(0, 2**31 - 1)))
    lengths = [blocksize] * full_blocks + ([tail] if tail else [])
    weight = torch.cat([block_values(kind, n, g, scale) for kind, n in zip(kinds, lengths)])
    numel = weight.numel()
    rows = draw(st.sampled_from([d for d in (1, 2, 3, 5, 7, 16) if numel % d == 0]))
    shape = (numel,) if draw(st.booleans()) else (rows, numel // rows)
    weight = weight.to(dtype)
    if draw(st.integers(0, 3)) == 0:  # an outlier of the dtype's OUTLIER_MAGNITUDE: in bf16 past fp16's 65,504
        weight = add_outliers(weight, 1, g)
    return weight.reshape(shape), blocksize


def grid_boundary_values(g: torch.Generator) -> torch.Tensor:
    """Normalized values a fraction of a grid cell from each midpoint between neighbouring dynamic-map levels."""
    code = dynamic_map()
    midpoints = (code[:-1] + code[1:]) / 2
    fractions = torch.tensor([-0.75, -0.5, -0.25, 0.25, 0.5, 0.75])
    return (midpoints + fractions[torch.randint(0, 6, (midpoints.numel(),), generator=g)] * (2.0 / 65535)).clamp(-1, 1)


def _grid_boundary_absmax(count: int, g: torch.Generator) -> torch.Tensor:
    """Centred absmax values around the midpoints between dynamic-map levels, a fraction of a grid cell away.

    Between such a midpoint and the nearest of the 65,536 grid points, bitsandbytes' grid lookup and a direct
    nearest-level search give different codes. Symmetric (+c and -c), so their mean is close to 0; +-1 fixes the scale.
    """
    targets = grid_boundary_values(g)
    half = torch.cat([torch.tensor([1.0]), targets[targets > 0]])[: max(1, count // 2)]
    return torch.cat([half, -half])[:count]


GROUP_KINDS = ("random", "scaled", "grid_boundary", "outlier", "all_equal")


@st.composite
def double_quant_weights(draw, max_numel: int = 40000):
    """``(weight, blocksize)`` for double quantization: often more than 256 blocks, each group unlike the others.

    Draws: 1 to 4 groups of 256 blocks (the last one short), each group's absmax with its own level and spread
    (per-group centring or one scale for all groups shows), a group around the dynamic map's midpoints (the
    65,536-point grid), a single-outlier block (the fp32 mean of the absmax differs from the float64 one), a group
    of equal absmax values, and plain random weights. fp32 only where the absmax values must stay exact.
    """
    blocksize = draw(st.sampled_from((32, 64) if draw(st.booleans()) else BLOCKSIZES))
    max_blocks = max(1, max_numel // blocksize)
    if blocksize > 64 or draw(st.integers(0, 3)) == 0:  # a plain random weight, any dtype
        numel = draw(st.integers(1, max_blocks * blocksize))
        g = seeded_generator(draw(st.integers(0, 2**31 - 1)))
        dtype = draw(st.sampled_from(DTYPES))
        return (torch.randn(numel, generator=g) * draw(st.sampled_from((1e-3, 0.02, 1.0)))).to(dtype), blocksize
    groups = draw(st.integers(1, max(1, min(4, -(-max_blocks // ABSMAX_BLOCKSIZE)))))
    last = draw(st.integers(1, ABSMAX_BLOCKSIZE))
    g = seeded_generator(draw(st.integers(0, 2**31 - 1)))
    absmax = []
    for group in range(groups):
        count = ABSMAX_BLOCKSIZE if group < groups - 1 else last
        kind = draw(st.sampled_from(GROUP_KINDS))
        level, spread = draw(st.sampled_from((0.01, 0.1, 1.0, 7.0))), draw(st.sampled_from((0.01, 0.3, 0.9)))
        if kind == "grid_boundary":
            values = level * (1 + spread * 0.5 * _grid_boundary_absmax(count, g))
        elif kind == "all_equal":
            values = torch.full((count,), level)
        else:
            values = level * (1 + spread * (torch.rand(count, generator=g) - 0.5))
            if kind == "outlier":
                values[int(torch.randint(0, count, (1,), generator=g))] = level * 300
        absmax.append(values.float())
    absmax = torch.cat(absmax)[:max_blocks]
    # Each block: its absmax first (sign drawn), then values strictly inside (-absmax, absmax).
    inside = (torch.rand(absmax.numel(), blocksize, generator=g) * 1.8 - 0.9) * absmax[:, None]
    inside[:, 0] = absmax * torch.where(torch.rand(absmax.numel(), generator=g) < 0.5, -1.0, 1.0)
    return inside.reshape(-1), blocksize
