"""NF4: the 4-bit NormalFloat storage of QLoRA's frozen base weights.

QLoRA keeps the base model frozen, so its weights only ever need to be *read*.
That makes a lossy 4-bit format acceptable, and NF4 is the one QLoRA chose:

1. Flatten the weight row-major and cut it into blocks of ``blocksize``
   consecutive elements (the last block may be short).
2. Divide each block by its largest magnitude (its *absmax*), so every value
   lands in [-1, 1].
3. Replace each value by the index (0..15) of the nearest of 16 fixed levels,
   ``NF4_CODE``. The levels are quantiles of a normal distribution, because
   trained weights are roughly normal: every level is used about equally often.
4. Pack two indices per byte, element ``2i`` in the high nibble.

*Double quantization* shrinks the per-block absmax too: subtract their mean,
then store each as an 8-bit index into bitsandbytes' "dynamic" map, with one
fp32 scale per 256 blocks. That saves about 0.37 bits per weight.

Everything here is pure torch and reproduces bitsandbytes' bytes exactly, so a
weight quantized here can be handed to bitsandbytes (``to_bnb``) and back.
bitsandbytes itself is imported only by ``to_bnb`` / ``from_bnb``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

# The 16 NF4 levels, exactly as bitsandbytes stores them (float32).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

ABSMAX_BLOCKSIZE = 256  # blocks of absmax values that share one fp32 scale (double quant)
VALID_BLOCKSIZES = tuple(2**p for p in range(5, 13))  # 32 ... 4096, as bitsandbytes accepts
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dynamic_map() -> torch.Tensor:
    """The 256-entry signed "dynamic" 8-bit map that double quantization uses.

    Dettmers' dynamic type spends its bits on the exponent: for each decade
    10^-6 ... 10^0 it places evenly spaced levels (more of them in larger
    decades), mirrored for negative values, plus 0 and 1. Built the way
    bitsandbytes' ``create_dynamic_map()`` builds it, so the values agree bit for bit.
    """
    values: list[float] = []
    exponent_bits = 7
    for i in range(exponent_bits):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (-(exponent_bits - 1) + i)
        values += (decade * midpoints).tolist()
        values += (-decade * midpoints).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _dynamic_lookup() -> tuple[torch.Tensor, torch.Tensor]:
    """The dynamic map and a 65,536-entry nearest-level table over [-1, 1].

    bitsandbytes' CPU kernel quantizes a normalized value ``v`` by rounding it
    onto a grid of 65,536 points, ``i = trunc((v + 1) / 2 * 65535 + 0.5)``, and
    looking up the level nearest to that grid point. We do the same so that the
    absmax codes are byte-identical, including values near a tie.
    """
    code = dynamic_map()
    grid = torch.arange(65536, dtype=torch.float32) / 65535.0 * 2 - 1
    nearest = (grid[:, None] - code[None, :]).abs().argmin(dim=1).to(torch.uint8)
    return code, nearest


def _nf4_midpoints() -> torch.Tensor:
    return (NF4_CODE[:-1] + NF4_CODE[1:]) / 2


ZERO_CODE = 7  # NF4_CODE[7] == 0.0


@dataclass(frozen=True)
class NF4Tensor:
    """A frozen weight stored as NF4. Field meanings are part of lora_lab's contract.

    ``packed`` holds two 4-bit codes per byte (element 2i in the high nibble);
    ``absmax`` one scale per block, either fp32 or, with ``double_quant``,
    uint8 indices into ``absmax_code`` scaled by ``absmax_scale`` (one per 256
    blocks) plus ``absmax_offset``.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    double_quant: bool = False
    absmax_code: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: float | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes plus the block statistics."""
        total = self.packed.numel() + self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            total += self.absmax_scale.numel() * 4 + 4  # scales + the fp32 offset
        return total

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block absmax as fp32, undoing double quantization if present."""
        if not self.double_quant:
            return self.absmax.float()
        codes = self.absmax_code.to(self.device).index_select(0, self.absmax.int())
        scales = self.absmax_scale
        if scales.numel() > 1:  # each scale serves a group of 256 blocks; a single one simply broadcasts
            scales = scales.repeat_interleave(ABSMAX_BLOCKSIZE)[: codes.numel()]
        return codes.mul_(scales).add_(self.absmax_offset)  # code * scale + offset, rounded as bitsandbytes does

    def dequantize(self) -> torch.Tensor:
        return dequantize_nf4(self)

    def to(self, device: torch.device | str) -> NF4Tensor:
        """A copy of this weight on ``device`` (the codes themselves do not change)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Tensor(move(self.packed), move(self.absmax), self.blocksize, self.shape, self.dtype,
                         self.double_quant, move(self.absmax_code), move(self.absmax_scale), self.absmax_offset)

    def to_bnb(self):
        """``(packed, QuantState)`` that ``bitsandbytes.functional.dequantize_4bit`` accepts."""
        from bitsandbytes.functional import QuantState

        common = dict(absmax=self.absmax, shape=self.shape, dtype=self.dtype, blocksize=self.blocksize,
                      code=NF4_CODE.to(self.device), quant_type="nf4")
        if not self.double_quant:
            return self.packed.reshape(-1, 1), QuantState(**common)
        nested = QuantState(absmax=self.absmax_scale, code=self.absmax_code.to(self.device), blocksize=ABSMAX_BLOCKSIZE,
                            dtype=torch.float32)
        offset = torch.tensor(self.absmax_offset, dtype=torch.float32, device=self.device)
        return self.packed.reshape(-1, 1), QuantState(**common, offset=offset, state2=nested)

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> NF4Tensor:
        """Wrap bitsandbytes' ``(packed, QuantState)`` without copying or re-quantizing."""
        if quant_state.quant_type != "nf4":
            raise ValueError(f"expected an 'nf4' QuantState, got quant_type={quant_state.quant_type!r}")
        packed = packed.reshape(-1)
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        shape = torch.Size(quant_state.shape)
        if quant_state.nested:
            nested = quant_state.state2
            return cls(packed, quant_state.absmax, quant_state.blocksize, shape, quant_state.dtype, True,
                       nested.code.float(), nested.absmax.float(), float(quant_state.offset))
        return cls(packed, quant_state.absmax.float(), quant_state.blocksize, shape, quant_state.dtype)


def check_weight(weight: torch.Tensor, blocksize: int) -> None:
    """Raise TypeError/ValueError naming what was expected unless ``weight`` and ``blocksize`` can be quantized."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor weight, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"expected a float32, float16 or bfloat16 weight, got {weight.dtype}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"expected blocksize to be a power of two from 32 to 4096, got {blocksize!r}")
    if weight.numel() == 0:
        raise ValueError(f"expected a non-empty weight, got shape {tuple(weight.shape)}")
    lowest, highest = torch.aminmax(weight)  # one pass and no weight-sized temporary (isfinite makes three); NaN propagates
    if not (torch.isfinite(lowest) and torch.isfinite(highest)):
        raise ValueError("expected a finite weight, but it contains NaN or Inf")


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Largest magnitude of each block of ``blocksize`` elements (last block may be short)."""
    blocks = -(-flat.numel() // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - flat.numel()))
    return padded.view(blocks, blocksize).abs().amax(dim=1)


def _nf4_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Block absmax as bitsandbytes stores it: a short, all-zero last block keeps 1e-38, not 0."""
    absmax = _blockwise_absmax(flat, blocksize)
    if flat.numel() % blocksize:
        absmax[-1] = absmax[-1].clamp(min=1e-38)
    return absmax


def _normalize_blocks(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Each element divided by its block's absmax, clamped to [-1, 1].

    Full blocks multiply by the reciprocal and a short last block divides, which
    is how bitsandbytes rounds; an all-zero block stays zero (absmax floored at 1e-38).
    """
    n = flat.numel()
    full = n - n % blocksize
    safe = absmax.clamp(min=1e-38)
    normalized = (flat[:full].view(-1, blocksize) * (1.0 / safe[: full // blocksize, None])).reshape(-1)
    if full < n:
        normalized = torch.cat([normalized, flat[full:] / safe[-1]])
    return normalized.clamp_(-1, 1)


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Double quantization: absmax → (uint8 codes, dynamic map, fp32 scales, offset).

    Public so that a loader that computes absmax slice by slice (``checkpoint.load_llama``)
    can double-quantize the complete statistics at the end, exactly as ``quantize_nf4`` would.
    """
    code, nearest = _dynamic_lookup()
    offset = absmax.mean()
    centered = absmax - offset
    scales = _blockwise_absmax(centered, ABSMAX_BLOCKSIZE)
    blocks = -(-centered.numel() // ABSMAX_BLOCKSIZE)
    padded = torch.nn.functional.pad(centered, (0, blocks * ABSMAX_BLOCKSIZE - centered.numel()))
    normalized = (padded.view(blocks, -1) * (1.0 / scales[:, None])).reshape(-1)[: centered.numel()]
    grid = ((normalized.clamp(-1, 1) + 1.0) * 0.5) * 65535.0 + 0.5
    # A block of equal absmax values has scale 0 and normalizes to NaN; bitsandbytes stores index 0.
    grid_index = torch.nan_to_num(grid, nan=0.0).long().clamp(0, 65535)
    codes = nearest.to(absmax.device)[grid_index]
    return codes, code.to(absmax.device), scales, float(offset)


def nearest_nf4_code(normalized: torch.Tensor) -> torch.Tensor:
    """The definition of step 3: the index of the NF4 level nearest to each value in [-1, 1].

    The nearest level is the one between the midpoints that enclose the value,
    so its index is the number of midpoints below the value. A value exactly on a
    midpoint takes the lower level, as bitsandbytes does (``bucketize``'s
    ``right=False``). ``quantize_nf4`` uses ``_nearest_nf4_code_by_bits``, which
    gives the same indices about ten times faster on the CPU (0.4 ms against 5 ms for 2^18 values).
    """
    return torch.bucketize(normalized, _nf4_midpoints().to(normalized.device))


@functools.cache
def _code_by_top_bits(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the 65,536 top-16-bit patterns of a float32: the code of the cell's smallest value, and the midpoint
    above that code (+inf above the last). A cell is indexed by its bits as a signed 16-bit number plus 32,768.

    The floats sharing their top 16 bits (sign, exponent, 7 mantissa bits) are a
    run of consecutive values under 1% wide, and no such cell in [-1, 1] holds two
    midpoints (``tests/test_nf4.py`` checks each). So ``nearest_nf4_code(x)`` is
    its cell's lowest code, plus one if ``x`` lies above the midpoint after it.
    """
    top = torch.arange(-(2**15), 2**15, dtype=torch.int32) * 2**16
    ends = torch.stack([top.view(torch.float32), (top + (2**16 - 1)).view(torch.float32)])
    lowest = ends.nan_to_num(nan=0.0).amin(dim=0)  # the NaN/Inf cells never occur: values are clamped to [-1, 1]
    base = nearest_nf4_code(lowest)
    midpoint_above = torch.cat([_nf4_midpoints(), torch.tensor([math.inf])])[base]
    return base.to(torch.uint8).to(device), midpoint_above.to(device)


def _nearest_nf4_code_by_bits(normalized: torch.Tensor) -> torch.Tensor:
    """``nearest_nf4_code`` for contiguous fp32 values, by two table look-ups and a comparison instead of a search.

    ``bucketize`` runs a binary search per element; here the top 16 bits of each
    float pick its cell in ``_code_by_top_bits``, and one comparison with the
    cell's midpoint settles it: about 6 vectorized passes, no branches.
    """
    base, midpoint_above = _code_by_top_bits(normalized.device)
    cell = (normalized.view(torch.int32) >> 16).add_(2**15)
    return base.index_select(0, cell) + (normalized > midpoint_above.index_select(0, cell))


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, element ``2i`` in the high nibble; an odd tail is padded with the code of 0.0 (7)."""
    if codes.numel() % 2:
        codes = torch.nn.functional.pad(codes, (0, 1), value=ZERO_CODE)
    return (codes[0::2] << 4) | codes[1::2]


CPU_CHUNK = 2**18  # elements per chunk on the CPU (whole blocks of any blocksize): 1 MB of fp32 per temporary


def _in_one_piece(numel: int, device: torch.device) -> bool:
    """A GPU takes any weight in one piece; the CPU a weight of up to ``CPU_CHUNK`` elements (see ``_chunks``)."""
    return device.type != "cpu" or numel <= CPU_CHUNK


def _chunks(numel: int, device: torch.device) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges of whole blocks that cover ``numel`` elements: ``CPU_CHUNK`` at a time on the CPU.

    Why: on the CPU each temporary of a whole 4096 x 4096 weight is a fresh 64 MB
    that the OS maps in page by page (about 25 ms on one core, more than the
    arithmetic); a chunk's temporaries stay in the caches and are reused. 2^18
    was the fastest of 2^16..2^18 for quantize and dequantize on a 2-core AMD EPYC.
    """
    step = numel if _in_one_piece(numel, device) else CPU_CHUNK
    return [(start, min(start + step, numel)) for start in range(0, numel, step)]


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantize ``weight`` to NF4, byte-identical with bitsandbytes' ``quantize_4bit``.

    Steps 1-4 of the module docstring, taken on a chunk of whole blocks at a time (``_chunks``).
    """
    check_weight(weight, blocksize)
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    packed = torch.empty(-(-n // 2), dtype=torch.uint8, device=flat.device)
    for start, stop in _chunks(n, flat.device):
        chunk = flat[start:stop].float()
        chunk_absmax = _nf4_absmax(chunk, blocksize)
        codes = _nearest_nf4_code_by_bits(_normalize_blocks(chunk, chunk_absmax, blocksize))
        absmax[start // blocksize : start // blocksize + chunk_absmax.numel()] = chunk_absmax
        packed[start // 2 : (stop + 1) // 2] = pack_codes(codes)
    if not double_quant:
        return NF4Tensor(packed, absmax, blocksize, weight.shape, weight.dtype)
    absmax_codes, absmax_code, scales, offset = quantize_absmax(absmax)
    return NF4Tensor(packed, absmax_codes, blocksize, weight.shape, weight.dtype, True, absmax_code, scales, offset)


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The 4-bit codes of ``packed`` in element order (high nibble first)."""
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)
    return codes[:numel]


def dequantize_nf4_by_definition(q: NF4Tensor) -> torch.Tensor:
    """The definition of dequantization: each element's level times its block's absmax, in fp32, rounded once.

    Plain and slow (an int64 index and an absmax per element, 200 MB of
    temporaries for a 4096 x 4096 weight); ``dequantize_nf4`` computes the same
    products faster, and the tests hold it to this one bit for bit.
    """
    codes = unpack_codes(q.packed, q.numel).long()
    absmax = q.absmax_fp32().repeat_interleave(q.blocksize)[: q.numel]
    return (NF4_CODE.to(q.device)[codes] * absmax).to(q.dtype).reshape(q.shape)


@functools.cache
def _byte_levels(device: torch.device) -> torch.Tensor:
    """(256,) table of 8-byte words: for each byte, its high and its low nibble's NF4 levels as two float32s.

    Looking a byte up in it unpacks both nibbles and finds both levels in one
    gather of one word, with a 4-byte index per byte instead of an 8-byte index
    per element (the slow part of ``dequantize_nf4_by_definition``).
    """
    byte = torch.arange(256)
    levels = torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 0x0F]], dim=1)
    return levels.view(torch.int64).reshape(256).to(device)


def _scaled_levels(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, numel: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The first ``numel`` elements (whole blocks) that ``packed`` holds, in fp32: each byte's two levels by one look-up
    in ``_byte_levels`` (one 8-byte word, into ``out`` when given), then each block scaled by its absmax in place.
    Returns all ``2 * len(packed)`` values: an odd last byte brings one past ``numel``."""
    words = None if out is None else out.view(torch.int64)
    levels = torch.index_select(_byte_levels(packed.device), 0, packed.int(), out=words).view(torch.float32)
    full = numel - numel % blocksize
    levels[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])
    if full < numel:  # the short last block
        levels[full:numel].mul_(absmax[-1])
    return levels


def dequantize_nf4(q: NF4Tensor) -> torch.Tensor:
    """Back to a dense tensor of ``q.shape`` and ``q.dtype``, equal to bitsandbytes' ``dequantize_4bit``.

    The numbers are ``dequantize_nf4_by_definition``'s: ``NF4_CODE[code] * absmax``
    in fp32, rounded once to ``q.dtype``; ``_scaled_levels`` computes them. A
    weight that fits one chunk (every layer of the tiny model; any weight on a
    GPU) takes one call. A larger one on the CPU goes a chunk of whole blocks at
    a time (``_chunks``): an fp32 weight in its output itself, fp16/bf16 in an
    fp32 chunk that is then rounded into the output.
    """
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"expected an NF4Tensor, got {type(q).__name__}")
    n, blocksize, absmax = q.numel, q.blocksize, q.absmax_fp32()
    if _in_one_piece(n, q.packed.device):
        return _scaled_levels(q.packed, absmax, blocksize, n)[:n].to(q.dtype).view(q.shape)
    chunk_inputs = [(start, stop, q.packed[start // 2 : (stop + 1) // 2], absmax[start // blocksize :])
                    for start, stop in _chunks(n, q.packed.device)]
    if q.dtype == torch.float32:
        values = torch.empty(2 * q.packed.numel(), device=q.device)  # room for an odd last byte's second level
        for start, stop, packed, block_absmax in chunk_inputs:
            _scaled_levels(packed, block_absmax, blocksize, stop - start, out=values[start : start + 2 * packed.numel()])
        return values[:n].view(q.shape)
    values = torch.empty(n, dtype=q.dtype, device=q.device)
    for start, stop, packed, block_absmax in chunk_inputs:
        values[start:stop] = _scaled_levels(packed, block_absmax, blocksize, stop - start)[: stop - start]  # rounds once
    return values.view(q.shape)
