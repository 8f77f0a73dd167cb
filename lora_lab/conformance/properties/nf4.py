"""Properties of NF4 storage (exercises 01 and 02), checked against bitsandbytes' own bytes.

bitsandbytes is the oracle: the packed codes, the absmax statistics and the
dequantized values must be identical to what ``bitsandbytes.functional``
produces for the same weight, because QLoRA checkpoints are exchanged in that
format. Dequantized values are compared on the flattened weight: bitsandbytes
0.50's CPU C kernel indexes blocks per row when a row is not a multiple of the
block size, while its torch and CUDA paths (and the NF4 format) index the
flattened weight.
"""

from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lora_lab.conformance.errors import CheckFailed, NotSupported
from lora_lab.conformance.judge.compare import assert_equal, assert_rejects, call_guarded, seeded_generator
from lora_lab.conformance.judge.contract import refill_tail
from lora_lab.conformance.judge.formats import (
    Capabilities,
    capabilities,
    from_interchange,
    has_own_format,
    interchange_capabilities,
    to_interchange,
)
from lora_lab.conformance.judge.oracles import bnb_dequantize
from lora_lab.conformance.judge.profiles import examples
from lora_lab.conformance.judge.strategies import (
    many_groups_witness,
    nf4_weights,
    nf4_witnesses,
    subnormal_absmax_witness,
)
from lora_lab.conformance.registry import INTERCHANGE, check
from lora_lab.nf4 import NF4_CODE, NF4Tensor, quantize_nf4, unpack_codes
from lora_lab.targets.libraries import bitsandbytes


def _bnb_quantize(weight: torch.Tensor, blocksize: int, double_quant: bool):
    return bitsandbytes().functional.quantize_4bit(
        weight, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant
    )


def supported_weights(supports: Capabilities, max_numel: int = 6000):
    """``strategies.nf4_weights`` restricted to what a format supports (everything, for an NF4Tensor target)."""
    return nf4_weights(max_numel, dtypes=supports.dtypes, blocksizes=supports.blocksizes, ragged=supports.ragged)


def with_witnesses(prop, supports: Capabilities | None = None, double_quant: bool = False):
    """Run the constructed NF4 witnesses first (``strategies.nf4_witnesses``), then hypothesis' drawn weights.

    Only the witnesses a format supports (all of them for an NF4Tensor target: fp32, blocksize 64, short blocks).
    """
    supports = supports or Capabilities()
    takes_double_quant = prop.__code__.co_argcount == 2
    for witness, blocksize in reversed(nf4_witnesses()):
        if (blocksize not in supports.blocksizes or witness.dtype not in supports.dtypes
                or (not supports.ragged and witness.numel() % blocksize)):
            continue
        drawn = (witness, blocksize)
        prop = (example(drawn, double_quant) if takes_double_quant else example(drawn))(prop)
    return prop


def _takes_many_groups(supports: Capabilities) -> bool:
    """Whether a format supports ``strategies.many_groups_witness``: double quant, blocksize 32, fp32."""
    return True in supports.double_quant and 32 in supports.blocksizes and torch.float32 in supports.dtypes


def _interchange(target, double_quant: bool | None = None) -> Capabilities:
    """What an interchange check may draw (NotSupported without a conversion to NF4Tensor, or without ``double_quant``)."""
    supports = interchange_capabilities(target)
    if double_quant is not None and double_quant not in supports.double_quant:
        raise NotSupported(supports.missing.get(f"double_quant {double_quant}", f"double_quant={double_quant}"))
    return supports


def _which_bug(weight: torch.Tensor, blocksize: int, got: torch.Tensor, want: torch.Tensor, where: str) -> str:
    """What the first differing code shows: an exact midpoint, a multiply/divide rounding, or a plain wrong level."""
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    got_codes, want_codes = unpack_codes(got.reshape(-1), n), unpack_codes(want.reshape(-1), n)
    differ = (got_codes != want_codes).nonzero()
    if not differ.numel():
        return f"packed bytes ({where}): the codes agree, the padding nibble of the odd last byte does not (code 7, 0.0)"
    i = int(differ[0])
    block = i // blocksize
    values = flat[block * blocksize : (block + 1) * blocksize]
    absmax = values.abs().max().clamp(min=1e-38)
    short = (block + 1) * blocksize > n
    multiplied, divided = flat[i] * (1.0 / absmax), flat[i] / absmax
    normalized = divided if short else multiplied
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    what = (f"packed bytes ({where}): element {i} (block {block}, {'the short last block' if short else 'a full block'}) "
            f"= {flat[i].item()!r}, absmax {absmax.item()!r}: expected code {int(want_codes[i])}, got {int(got_codes[i])}")
    rounding = bool(torch.bucketize(multiplied, midpoints) != torch.bucketize(divided, midpoints))
    cause = ""
    if bool((midpoints == normalized).any()):
        cause = "it lies exactly on the fp32 midpoint between two levels; bitsandbytes picks the lower one (compare in fp32)"
    elif bool((midpoints - normalized).abs().min() <= 2 * torch.finfo(torch.float32).eps) and not rounding:
        cause = "it lies within an ulp of a midpoint between two levels: compare with the fp32 midpoints, not float64 ones"
    elif not rounding:
        cause = "not a tie: the level picked is not the nearest one"
    if rounding:  # the other operation would have landed on the other side: say so too
        cause += ("; " if cause else "") + (
            "x * (1 / absmax) and x / absmax round to different sides of a midpoint here: bitsandbytes multiplies "
            "by the reciprocal in full blocks, divides in the short last block")
    return f"{what}; {cause}"


def _quantize(target, weight, blocksize, double_quant, deterministic: bool = False) -> NF4Tensor:
    """The target's quantize_nf4 as an NF4Tensor (its own format converted by its to_nf4, for the interchange level)."""
    q = call_guarded(target.op("quantize_nf4"), weight, blocksize, double_quant, name="quantize_nf4",
                     deterministic=deterministic)
    if has_own_format(target):
        q = to_interchange(target, q)
    for field in ("packed", "absmax", "blocksize", "shape", "dtype", "double_quant"):
        if not hasattr(q, field):
            raise CheckFailed(f"quantize_nf4 must return an NF4Tensor-like object with a {field!r} field")
    check_fields(q, weight.numel(), blocksize, double_quant)
    return q


def _field_error(q, numel: int, blocksize: int, double_quant: bool) -> str | None:
    blocks = -(-numel // blocksize)
    if q.double_quant is not double_quant:
        return f"double_quant is {q.double_quant!r}, expected {double_quant} (as requested)"
    if not isinstance(q.packed, torch.Tensor) or q.packed.dtype != torch.uint8 or q.packed.numel() != -(-numel // 2):
        return f"packed must be uint8 with ceil(numel/2) = {-(-numel // 2)} bytes"
    if not isinstance(q.absmax, torch.Tensor) or q.absmax.numel() != blocks:
        return f"absmax must hold one value per block: ceil({numel}/{blocksize}) = {blocks}"
    extras = [getattr(q, f, None) for f in ("absmax_code", "absmax_scale", "absmax_offset")]
    if not double_quant:
        if q.absmax.dtype != torch.float32 or any(e is not None for e in extras):
            return "without double quantization absmax must be float32 and absmax_code/scale/offset None"
        return None
    code, scale, offset = extras
    if q.absmax.dtype != torch.uint8:
        return f"with double quantization absmax must be uint8 codes, got {q.absmax.dtype}"
    if not isinstance(code, torch.Tensor) or code.numel() != 256 or not isinstance(scale, torch.Tensor):
        return "with double quantization absmax_code must be the 256-value map and absmax_scale a tensor"
    if scale.dtype != torch.float32 or scale.numel() != -(-blocks // 256):
        return f"absmax_scale must be float32 with one value per 256 blocks: {-(-blocks // 256)}"
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        return f"absmax_offset must be a Python float, got {type(offset).__name__}"
    return None


def check_fields(q, numel: int, blocksize: int, double_quant: bool) -> None:
    """The NF4Tensor's fields agree with each other and with what was asked: readers trust the flag to read the fields."""
    error = _field_error(q, numel, blocksize, double_quant)
    if error:
        raise CheckFailed(f"inconsistent NF4Tensor from quantize_nf4 (numel={numel}, blocksize={blocksize}, "
                          f"double_quant={double_quant}): {error}")


@check(
    "nf4.bytes_match_bitsandbytes",
    requires=("quantize_nf4",),
    points=10,
    exercise="01",
    level=INTERCHANGE,
    hint="Flatten row-major, one absmax per block of `blocksize` values (the last block may be short), "
    "pick the nearest NF4 level (bucketize against the fp32 midpoints between levels: an exact midpoint takes the "
    "lower level), full blocks multiply by 1/absmax while the short last block divides, and put element 2i in the "
    "HIGH nibble of byte i. An odd count pads with the code of 0.0. Only a short all-zero last block stores 1e-38; "
    "the divisor is floored at 1e-38 (an absmax may be subnormal), never repaired afterwards with nan_to_num.",
)
def bytes_match_bitsandbytes(target) -> None:
    """Packed NF4 codes and fp32 absmax are byte-identical with bitsandbytes.quantize_4bit.

    Draws ``strategies.nf4_weights``: exact midpoints and their one-ulp neighbours, the multiply-vs-divide witness
    in full and short blocks, all-equal, single-outlier and all-zero blocks, full and short last blocks; and a block
    whose absmax is an fp32 subnormal (the 1e-38 floor, not nan_to_num).
    """
    supports = _interchange(target, double_quant=False)

    @settings(max_examples=examples(25))
    @given(supported_weights(supports))
    @lambda prop: with_witnesses(prop, supports)
    @example(subnormal_absmax_witness())  # only here: no other check is judged by bitsandbytes' own bytes
    def prop(drawn):
        weight, blocksize = drawn
        for call in ("first", "refilled"):  # the second call: same storage and prefix, new tail (no cached answer)
            if call == "refilled":
                refill_tail([weight], seeded_generator(weight.numel()))
            q = _quantize(target, weight, blocksize, False, deterministic=call == "first")
            packed, state = _bnb_quantize(weight, blocksize, False)
            where = f"blocksize={blocksize}, shape={tuple(weight.shape)}, {weight.dtype}, {call} call"
            assert_equal(q.absmax.reshape(-1), state.absmax, f"per-block absmax ({where}; a full all-zero block "
                         "stores 0, a short all-zero last block 1e-38)")
            got = q.packed.reshape(-1)
            if got.dtype != torch.uint8 or got.shape != packed.reshape(-1).shape:
                assert_equal(got, packed.reshape(-1), f"packed bytes ({where})")
            if not torch.equal(got, packed.reshape(-1)):
                raise CheckFailed(_which_bug(weight, blocksize, got, packed, where))
            if tuple(q.shape) != tuple(weight.shape) or q.dtype != weight.dtype or q.blocksize != blocksize:
                raise CheckFailed(
                    f"expected shape {tuple(weight.shape)}, dtype {weight.dtype}, blocksize {blocksize} to be recorded; "
                    f"got {tuple(q.shape)}, {q.dtype}, {q.blocksize}"
                )

    prop()


@check(
    "nf4.dequantize_matches_bitsandbytes",
    requires=("dequantize_nf4",),
    points=8,
    exercise="01",
    level=INTERCHANGE,
    hint="Unpack high nibble first, look each code up in NF4_CODE, multiply by its block's absmax in fp32, "
    "and round to the original dtype only once, at the end.",
)
def dequantize_matches_bitsandbytes(target) -> None:
    """Dequantized values equal bitsandbytes.dequantize_4bit exactly, in the original shape and dtype.

    Draws ``strategies.nf4_weights`` (single and double quantization), so every code 0..15, zero and short last
    blocks and odd element counts appear; and a double-quantized weight of 600 blocks, three absmax scales that differ.
    """
    supports = _interchange(target)

    @settings(max_examples=examples(25))
    @given(supported_weights(supports), st.sampled_from(supports.double_quant))
    @lambda prop: with_witnesses(prop, supports, supports.double_quant[0])
    @lambda prop: example(many_groups_witness(), True)(prop) if _takes_many_groups(supports) else prop
    def prop(drawn, double_quant):
        weight, blocksize = drawn
        q = quantize_nf4(weight, blocksize, double_quant)
        for call in ("first", "refilled"):  # the second call: same storage and prefix, new codes in the tail
            if call == "refilled":
                refill_tail([q.packed], seeded_generator(weight.numel()))
            given_q = from_interchange(target, q) if has_own_format(target) else q  # the same bytes, in its format
            got = call_guarded(target.op("dequantize_nf4"), given_q, name="dequantize_nf4", deterministic=call == "first")
            where = f"blocksize={blocksize}, double_quant={double_quant}, {weight.dtype}, {call} call"
            assert_equal(got, bnb_dequantize(q), f"dequantized weight ({where})")

    prop()


@check(
    "nf4.rejects_bad_input",
    requires=("quantize_nf4",),
    points=3,
    exercise="01",
    hint="Validate before computing: an integer or float64 weight, a blocksize that is not a power of two in 32..4096, an "
    "empty weight or one holding NaN/Inf must raise an exception (ValueError, by convention) naming what was expected.",
)
def rejects_bad_input(target) -> str:
    """Every bad input (integer or float64 weight, bad blocksize, empty weight, NaN/Inf) is refused by a clear
    exception, not a result."""
    quantize = target.op("quantize_nf4")
    double_quant = capabilities(target).double_quant[0]  # a setting the format supports: the input is what is bad
    cases = {
        "an integer weight": (torch.ones(64, dtype=torch.int32), 64),
        "a float64 weight (NF4 stores fp32, fp16 or bf16 weights)": (torch.randn(64, dtype=torch.float64), 64),
        "blocksize=48 (not a power of two)": (torch.randn(64), 48),
        "blocksize=16 (below 32)": (torch.randn(64), 16),
        "blocksize=8192 (above 4096)": (torch.randn(64), 8192),
        "an empty weight": (torch.empty(0, 4), 64),
        "a weight holding NaN": (torch.tensor([1.0, float("nan")] * 32), 64),
        "a weight holding Inf": (torch.tensor([1.0, float("inf")] * 32), 64),
    }
    if has_own_format(target):  # the range 32..4096 and the dtypes are the NF4Tensor contract's; another format may differ
        cases = {k: v for k, v in cases.items() if "below 32" not in k and "above 4096" not in k and "float64" not in k}
    return assert_rejects(lambda weight, blocksize: quantize(weight, blocksize, double_quant), cases, "quantize_nf4")
