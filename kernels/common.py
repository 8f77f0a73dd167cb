"""What the kernels share: decoding an NF4 tile in registers, rounding like torch, and where they run.

Decoding NF4
------------
A weight element at flat (row-major) index ``e`` is stored as the 4-bit code in
byte ``e // 2`` (the HIGH nibble when ``e`` is even) and belongs to NF4 block
``e // blocksize``. Its value is ``NF4_CODE[code] * absmax[block]``, multiplied
in fp32 and rounded once to the weight's dtype. With double quantization the
absmax itself is decoded first, ``absmax_code[c] * absmax_scale[block // 256] +
absmax_offset``, rounding after the product and again after the sum, exactly as
``lora_lab.nf4.NF4Tensor.absmax_fp32`` does. A fused multiply-add would round
once and change the last bit, so every kernel is launched with
``enable_fp_fusion=False`` (``LAUNCH_OPTIONS``); the tensor-core matmuls are not
affected by that flag.

The matmul kernels read W in tiles of ``BLOCK_K`` consecutive elements per row.
``K`` is a multiple of ``blocksize`` and ``BLOCK_K`` divides ``blocksize``, so
a tile row never straddles two NF4 blocks: it needs one absmax per row, not one
per element.

Rounding like torch, and bf16 under the interpreter
---------------------------------------------------
On a GPU a cast ``.to(tl.bfloat16)`` rounds to nearest-even, as torch does. The
Triton interpreter (CPU) stores bf16 as raw 16-bit patterns: its fp32 -> bf16
cast truncates, and its ``tl.dot`` on bf16 multiplies the bit patterns as
integers. So when interpreting, ``round_to`` rounds to bf16 with integer
arithmetic on the fp32 bits and keeps the result as the fp32 number it equals,
and bf16 tiles are widened to fp32 (``dot_dtype``) before ``tl.dot``. bf16 x bf16
products are exact in fp32 and both paths accumulate in fp32, so the
interpreter computes what the GPU computes, up to summation order.

Where the kernels run
---------------------
Triton decides when a kernel is defined whether it will be interpreted, so
this module sets ``TRITON_INTERPRET=1`` before importing Triton when there is
no CUDA device, and ``INTERPRETING`` is fixed for the process: without a GPU,
CPU tensors run through the interpreter; with one, CUDA tensors run through
compiled kernels, and CPU tensors are refused with an error that says so
(unless you set ``TRITON_INTERPRET=1`` yourself, which interprets everything).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

import torch

# Triton decides at kernel definition whether to interpret, from TRITON_INTERPRET; so set it before importing triton.
_NO_GPU = not torch.cuda.is_available()
_TRITON_IMPORTED_FIRST = "triton" in sys.modules
if _NO_GPU and os.environ.get("LORA_LAB_COMPILE_ONLY", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lora_lab.nf4 import ABSMAX_BLOCKSIZE, NF4_CODE, VALID_BLOCKSIZES, NF4Tensor  # noqa: E402


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:  # Triton >= 3.4 reads the variable when a kernel is defined
        return bool(knobs.runtime.interpret)
    if _NO_GPU and _TRITON_IMPORTED_FIRST:
        warnings.warn(
            "triton was imported before lora_lab.kernels could set TRITON_INTERPRET=1, and this Triton version may "
            "have read it already; if the kernels fail on the CPU, set TRITON_INTERPRET=1 in the environment",
            stacklevel=3,
        )
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


INTERPRETING: bool = _interpreting()
# LORA_LAB_COMPILE_ONLY=1 (with TRITON_INTERPRET=0) defines the kernels compiled, for a GPU this machine need not have:
# they can be compiled for a named target (``python -m lora_lab.kernels.compile.compile_check``) but not launched.
COMPILE_ONLY: bool = os.environ.get("LORA_LAB_COMPILE_ONLY", "0") == "1"
if COMPILE_ONLY and INTERPRETING:
    raise ImportError(
        "lora_lab.kernels: LORA_LAB_COMPILE_ONLY=1 compiles the kernels for a GPU, which Triton's interpreter cannot do; "
        "set TRITON_INTERPRET=0 as well (before importing triton)"
    )
if _NO_GPU and not INTERPRETING and not COMPILE_ONLY:
    raise ImportError(
        f"lora_lab.kernels: there is no CUDA device and TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}; "
        "set TRITON_INTERPRET=1 (before importing triton) to run the kernels on the CPU under Triton's interpreter"
    )


@functools.cache
def check_interpreter_numpy() -> None:
    """Triton before 3.8 interprets ``range(0, K, ...)`` with ``int()`` of a 1-element array, which numpy 2.4 refuses.

    torch's CUDA wheels pin an older Triton (torch 2.11: 3.6.0), so the requirement
    cannot be ``triton>=3.8``; only the matmul kernels under the interpreter (no
    GPU) are affected, so their launchers call this first: a clear error with what
    to install, instead of a TypeError from inside a kernel.
    """
    if not INTERPRETING:
        return
    import numpy

    def version(text: str) -> tuple[int, int]:
        return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())

    if version(triton.__version__) < (3, 8) and version(numpy.__version__) >= (2, 4):
        raise ImportError(
            f"lora_lab.kernels: Triton {triton.__version__}'s interpreter (used without a GPU) cannot run with numpy "
            f"{numpy.__version__}: install 'numpy<2.4' or 'triton>=3.8' (on a GPU machine keep torch's own triton)"
        )

# Write NaN into every output buffer before a kernel runs, so a kernel that skips an element is caught (tests set it).
POISON_OUTPUTS: bool = os.environ.get("LORA_LAB_POISON_OUTPUTS", "0") == "1"
# LORA_LAB_AUTOTUNE=0 skips autotuning on the GPU: each kernel uses its first valid config (fast compiles for tests).
AUTOTUNE: bool = os.environ.get("LORA_LAB_AUTOTUNE", "1") != "0" and not INTERPRETING
# No fused multiply-add: the double-quant absmax must round after the product and after the offset, as torch does.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}

# Storage kinds, passed to kernels as constexpr ints (simpler to specialize on than dtypes).
FP32: tl.constexpr = tl.constexpr(0)
FP16: tl.constexpr = tl.constexpr(1)
BF16: tl.constexpr = tl.constexpr(2)
KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ABSMAX_GROUP: tl.constexpr = tl.constexpr(ABSMAX_BLOCKSIZE)  # absmax values that share one fp32 scale


def dtype_kind(dtype: torch.dtype) -> int:
    """The constexpr kind of a float dtype; only fp32, fp16 and bf16 have kernels."""
    if dtype not in KINDS:
        raise TypeError(f"expected float32, float16 or bfloat16, got {dtype}; the kernels support only these")
    return KINDS[dtype]


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer: uninitialised, or full of NaN when ``POISON_OUTPUTS`` is on."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_device(*tensors: torch.Tensor) -> None:
    """Compiled kernels need CUDA tensors; the interpreter takes any device (it copies to the host)."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"expected all tensors on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop()
    if not INTERPRETING and device.type != "cuda":
        raise ValueError(
            f"tensors are on {device}, but Triton compiles these kernels for CUDA: move them with .cuda(), "
            "or set TRITON_INTERPRET=1 before importing triton to run them on the CPU"
        )


@functools.cache
def _levels_on(device: torch.device) -> torch.Tensor:
    return NF4_CODE.to(device)


@functools.cache
def nf4_pair_levels(device: torch.device) -> torch.Tensor:
    """(256, 2) fp32: the levels of a byte's two codes, high nibble first; the matmul kernels look up bytes, not nibbles."""
    codes = torch.arange(256)
    return torch.stack([NF4_CODE[codes >> 4], NF4_CODE[codes & 0x0F]], dim=1).contiguous().to(device)


def weight_arguments(q: NF4Tensor) -> tuple:
    """``(packed, levels, absmax, absmax_code, absmax_scale, absmax_offset)`` for a kernel launch.

    Without double quantization the three double-quant arguments are never read,
    so ``absmax`` stands in for the two pointers and the offset is 0.
    """
    packed, levels = q.packed.contiguous(), _levels_on(q.packed.device)
    if q.double_quant:
        code = q.absmax_code.to(device=packed.device, dtype=torch.float32).contiguous()
        scale = q.absmax_scale.to(device=packed.device, dtype=torch.float32).contiguous()
        return packed, levels, q.absmax.contiguous(), code, scale, float(q.absmax_offset)
    absmax = q.absmax.float().contiguous()
    return packed, levels, absmax, absmax, absmax, 0.0


def r_padded(r: int) -> int:
    """The LoRA rank padded to a power of two, at least 16: the smallest tl.dot operand on tensor cores."""
    return max(16, triton.next_power_of_2(r))


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The dtype tl.dot multiplies for inputs of ``dtype``: itself, except bf16 under the interpreter (fp32)."""
    if dtype == torch.bfloat16 and INTERPRETING:
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs must not be rounded to TF32 (10-bit mantissa): the tolerance is fp32's. Moot for fp16/bf16."""
    return "ieee" if dtype == torch.float32 or INTERPRETING else "tf32"


def check_block_multiple(k: int, blocksize: int) -> None:
    """The fused kernels read W in tiles that never straddle two NF4 blocks, so K must be a whole number of blocks."""
    if k % blocksize == 0:
        return
    fitting = [b for b in VALID_BLOCKSIZES if k % b == 0]
    advice = f"quantize with blocksize={fitting[-1]} (or another that divides {k})" if fitting else "no NF4 blocksize divides it"
    raise ValueError(
        f"the fused kernels need K (in_features={k}) to be a multiple of the NF4 blocksize {blocksize}: {advice}; "
        "lora_lab.lora.qlora_linear takes any K"
    )


@triton.jit
def load_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, block, mask, DOUBLE_QUANT: tl.constexpr):
    """fp32 absmax of NF4 blocks ``block``: stored directly, or decoded code -> scale -> offset (two roundings)."""
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax_scale_ptr + block // ABSMAX_GROUP, mask=mask, other=0.0)
        absmax = tl.load(absmax_code_ptr + code) * scale + absmax_offset
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return absmax


@triton.jit
def load_nf4_levels(packed_ptr, levels_ptr, index, mask):
    """NF4_CODE[code] of the elements at flat ``index``: byte ``index // 2``, its high nibble when ``index`` is even.

    Each byte is loaded once per nibble (neighbouring lanes share the address, so
    the second load is a cache hit); shifting by a per-element amount keeps the
    tile's layout as it is, which matters once the tile feeds tl.dot.
    """
    packed = tl.load(packed_ptr + index // 2, mask=mask, other=0)
    codes = (packed >> ((1 - index % 2) * 4)) & 0x0F
    return tl.load(levels_ptr + codes.to(tl.int32))


@triton.jit
def load_nf4_tile(
    packed_ptr, levels_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset,
    row_start,  # (ROWS,) int64 flat index of each tile row's first element (even: K and the K step are even)
    block,  # (ROWS,) the NF4 block every element of that tile row belongs to
    row_mask,  # (ROWS,) rows that exist
    BLOCK_K: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
):
    """fp32 values of a (ROWS, BLOCK_K) tile of W, decoded in registers; W is never written out.

    A tile row is BLOCK_K / 2 consecutive bytes, loaded as bytes (contiguous,
    hence vectorized). Each byte indexes ``levels_ptr``, the 256 x 2 table of
    ``nf4_pair_levels``, which holds the levels of its two codes, high nibble
    first: one 8-byte lookup gives two weights, with no shift or mask at all.
    Addressing each element's byte on its own cost a 64-bit index, a division,
    a parity and a variable shift per weight. The lookup reads the pair as one
    int64, whose low half is the first level (little-endian, as on every GPU and
    CPU Triton runs on): the address is then one multiply-add, ``table + 8 *
    byte``, where two fp32 elements per byte cost ptxas a shift, masks and a
    64-bit add per byte (measured: 8.0 -> 6.8 SASS instructions a weight in the
    small-M kernel on sm_90a, 16.6 -> 12.9 in the forward). The two levels
    are then bitcast out of the int64's halves and interleaved along K
    (``tl.join``), which keeps each thread's values contiguous.

    Why a table and not the 16 levels selected in registers: a lookup is a
    gather, which Triton's pipeline stages through shared memory, where a pure
    elementwise decode would let it decode the packed bytes in the MMA operand's
    registers. But the levels are 16 arbitrary fp32 constants and the product
    must be exact, so in registers each weight needs a 16-way select, and ptxas
    emits about 10 SELs a weight for it. Measured with ``compile_check --sass``
    (Triton 3.9, bf16, r = 16, the kernels of commit d1fb0f9): the K loop's SASS
    instructions and shared-memory bytes per weight, the table (as two fp32
    elements, before the int64 lookup above) against the alternatives, all
    bit-exact:

                                                 small M, sm_90a   small M, sm_80   forward 128x64x64, sm_90a
    the table (one 8-byte lookup per byte)       8.0 ins, 11 B     6.8 ins, 11 B    17.3 ins, 24 B
    4-bit select tree (int or fp32 constants)    17.4 ins, 3 B     19.9 ins, 3 B    25.3 ins, 11 B
    16-entry table, one 4-byte lookup a weight   10.8 ins, 11 B    10.7 ins, 11 B   19.6 ins, 21 B
    tl.gather from a (16,) register table        9.5 ins, 11 B     9.4 ins, 11 B    16.8 ins, 16 B, C7515

    The select tree moves a quarter of the shared-memory bytes but issues twice
    the instructions, and with the small-M kernel's W as the MMA's register
    operand ptxas serialized its wgmma (C7515); ``tl.gather`` is lowered
    through shared memory too. So the table stays, the cheapest exact decode in
    SASS. ``levels_ptr`` is that table (``nf4_pair_levels``), not ``NF4_CODE``.
    """
    byte_ptrs = packed_ptr + (row_start // 2)[:, None] + tl.arange(0, BLOCK_K // 2)[None, :]
    packed = tl.load(byte_ptrs, mask=row_mask[:, None], other=0).to(tl.int32)
    pairs = tl.load(levels_ptr.to(tl.pointer_type(tl.int64), bitcast=True) + packed)  # (ROWS, BLOCK_K // 2)
    high = (pairs & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)  # the level of the byte's high nibble
    low = (pairs >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    absmax = load_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, block, row_mask, DOUBLE_QUANT)
    values = tl.join(high * absmax[:, None], low * absmax[:, None])  # (ROWS, BLOCK_K // 2, 2): element order
    return tl.reshape(values, (packed.shape[0], BLOCK_K))


@triton.jit
def decode_nf4_bytes(packed, levels_ptr, absmax):
    """fp32 values of the NF4 bytes ``packed`` (ROWS, ...), two weights a byte: a (ROWS, 2·bytes a row) tile.

    The decode of ``load_nf4_tile`` (see there) for bytes a kernel has loaded
    itself, e.g. through pointers it advances along K instead of recomputing
    them each step. ``load_nf4_tile`` keeps its own copy of these lines: called
    from there, this function changed ptxas' schedule of the NF4 matmul kernels
    (compile_check --sass, bf16, sm_90a: the forward's 128 x 64 x 64 tile 12.94
    -> 12.06 instructions a weight, but grad_input's 32 x 64 x 32 at r = 64
    13.19 -> 14.19). ``absmax`` broadcasts against ``packed``: (ROWS, 1) for
    one NF4 block a row of a 2-D ``packed``, or (ROWS, BLOCKS, 1) for a
    (ROWS, BLOCKS, BYTES) ``packed`` that spans several NF4 blocks a row.
    The tile's columns are the bytes' weights in memory order.
    """
    pairs = tl.load(levels_ptr.to(tl.pointer_type(tl.int64), bitcast=True) + packed.to(tl.int32))  # (ROWS, B)
    high = (pairs & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)  # the level of the byte's high nibble
    low = (pairs >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    values = tl.join(high * absmax, low * absmax)  # (ROWS, B, 2): element order
    return tl.reshape(values, (packed.shape[0], 2 * packed.numel // packed.shape[0]))


@triton.jit
def weight_tile(
    packed_ptr, levels_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset,
    rows,  # (ROWS,) int64 rows of W
    row_mask,  # (ROWS,) rows that exist
    col_start,  # first column of the tile, a multiple of BLOCK_K
    K, NF4_BLOCKSIZE: tl.constexpr,
    BLOCK_K: tl.constexpr, DOUBLE_QUANT: tl.constexpr, W_DENSE: tl.constexpr,
    W_ROUND: tl.constexpr, X_KIND: tl.constexpr, INTERPRET: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """The (ROWS, BLOCK_K) tile of W as a matmul operand: ``dequantize_nf4(W).to(x.dtype)``, exactly.

    Decoded from NF4 in registers, or, with ``W_DENSE``, loaded from a weight
    decoded once already (``packed_ptr`` is then W in x's dtype, (N, K)): the
    large-M path, where decoding W once per row tile would cost more than
    reading it dense.
    """
    row_start = rows * K + col_start
    if W_DENSE:
        w = tl.load(packed_ptr + row_start[:, None] + tl.arange(0, BLOCK_K)[None, :], mask=row_mask[:, None], other=0.0)
        w = w.to(DOT_DTYPE)
    else:
        w = load_nf4_tile(
            packed_ptr, levels_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset,
            row_start, rows * (K // NF4_BLOCKSIZE) + col_start // NF4_BLOCKSIZE, row_mask, BLOCK_K, DOUBLE_QUANT,
        )
        w = weight_operand(w, W_ROUND, X_KIND, INTERPRET)
    return w


@triton.jit
def round_to(values, KIND: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 ``values`` rounded to nearest-even in storage kind ``KIND``, as torch's ``.to(dtype)`` rounds.

    Returns the narrow dtype itself, except bf16 under the interpreter: there the
    result is the fp32 number the bf16 value equals (see the module docstring).
    """
    if KIND == FP16:
        result = values.to(tl.float16)
    elif KIND == BF16:
        if INTERPRET:
            bits = values.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16  # round half to even on the dropped 16 bits
            result = bits.to(tl.float32, bitcast=True)
        else:
            result = values.to(tl.bfloat16)
    else:
        result = values
    return result


@triton.jit
def weight_operand(values, W_ROUND: tl.constexpr, X_KIND: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 weight values as the reference sees them: rounded to W's dtype (``W_ROUND``), then to x's."""
    if W_ROUND != FP32:
        values = round_to(values, W_ROUND, INTERPRET).to(tl.float32)
    return round_to(values, X_KIND, INTERPRET)


def weight_rounding(weight_dtype: torch.dtype, x_dtype: torch.dtype) -> int:
    """The intermediate rounding a W tile needs before becoming x's dtype.

    The reference computes ``dequantize_nf4(W).to(x.dtype)``: two roundings, the
    first of which matters only when W's dtype is neither fp32 nor x's dtype.
    """
    if weight_dtype in (torch.float32, x_dtype):
        return 0
    return dtype_kind(weight_dtype)
