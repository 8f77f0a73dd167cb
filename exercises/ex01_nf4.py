"""Exercise 01: store a weight in 4 bits (NF4), and read it back.

Lecture step 1, the forward pass. QLoRA freezes the base model and keeps its
weights in 4-bit NormalFloat (NF4). Every forward pass reads those weights, so
this storage format is the first thing a QLoRA layer touches. It is also where
QLoRA's memory saving comes from: an 8B-parameter model drops from 16 GB in
bf16 to about 4.5 GB in NF4, which is why it fits on one consumer GPU.

The idea
--------
Trained weights are roughly normally distributed. NF4 has 16 levels, ``NF4_CODE``,
placed at quantiles of a normal distribution, so each level is used about
equally often and no bit is wasted. The levels lie in [-1, 1]. To use them, a
weight is cut into *blocks* of ``blocksize`` consecutive values, and each block
is scaled by its largest magnitude, its *absmax*:

    absmax[b]  = max |w[e]|  over the elements e of block b
    code[e]    = the index (0..15) of the level nearest to  w[e] / absmax[b]
    w_hat[e]   = NF4_CODE[code[e]] * absmax[b]                       (dequantize)

A block keeps only one fp32 scale, so an outlier spoils just its own block.

The spec (bitsandbytes' format, byte for byte)
-----------------------------------------------
QLoRA checkpoints are exchanged in bitsandbytes' layout, so the grader compares
your bytes with ``bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4")``.

1. Validate first. Raise ``ValueError`` naming what was expected when the weight
   is not float32/float16/bfloat16, is empty, or holds NaN or Inf, or when
   ``blocksize`` is not a power of two from 32 to 4096.
2. Flatten the weight row-major into fp32 and cut it into blocks of
   ``blocksize`` elements; the last block may be short (any numel is allowed).
   ``absmax`` is fp32, one value per block. bitsandbytes quirk: a *short* last
   block that is all zeros stores 1e-38, not 0 (a full zero block stores 0).
3. Normalize: full blocks are *multiplied* by ``1 / absmax``; the short last
   block is *divided* by its absmax (that is how bitsandbytes rounds, and one
   ulp decides a code near a tie). An all-zero block must give zeros, never
   NaN: never divide by 0 (floor the divisor at 1e-38). Clamp to [-1, 1].
4. Nearest level: compare against the 15 midpoints between neighbouring
   levels; a value exactly on a midpoint takes the lower level.
5. Pack two codes per byte: element ``2i`` goes in the HIGH nibble of byte
   ``i``, element ``2i + 1`` in the low nibble. An odd count is padded with the
   code of 0.0 (code 7). ``packed`` is uint8, 1-D, ``ceil(numel / 2)`` bytes.
6. Dequantize: unpack, look the codes up in ``NF4_CODE``, multiply by the
   block's absmax in fp32, and round to the original dtype once, at the end.
   Use ``q.absmax_fp32()`` for the per-block absmax: it also undoes double
   quantization (the storage of exercise 02), which the grader uses too.

Your ``quantize_nf4`` returns ``lora_lab.nf4.NF4Tensor(packed, absmax,
blocksize, shape, dtype)``. ``quantize_nf4`` below is already written: it calls
your helpers in order. Fill them in from top to bottom, then ``dequantize_nf4``.

Grading: ``lora-lab grade --only 01`` (or ``python exercises/ex01_nf4.py``).
The sizes, shapes, dtypes and block sizes are drawn fresh by hypothesis, so a
solution that only works for one shape will not pass.

The reference solution is lora_lab/nf4.py (``quantize_nf4``, ``dequantize_nf4``
and the helpers above them). Try first!
"""

from __future__ import annotations

import torch

from lora_lab.nf4 import NF4_CODE, NF4Tensor  # noqa: F401  (NF4_CODE: the 16 levels, yours to use)
from lora_lab.nf4 import quantize_nf4 as _reference_quantize

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def check_weight(weight: torch.Tensor, blocksize: int) -> None:
    """Raise ValueError (or TypeError for a non-tensor) for input that would quantize to garbage.

    Bad input: a dtype other than float32/float16/bfloat16, an empty weight,
    NaN or Inf anywhere, a blocksize not in ``VALID_BLOCKSIZES``. Say in the
    message what was expected and what you got.
    """
    raise NotImplementedError("exercise 01: write check_weight")


def blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """fp32 absmax of each block of ``blocksize`` consecutive elements of the 1-D ``flat``.

    ``ceil(numel / blocksize)`` values; the last block may be short, and a short
    all-zero last block stores 1e-38 (bitsandbytes does).
    Tip: pad ``flat`` with zeros to a whole number of blocks, then ``view(blocks, blocksize)``.
    """
    raise NotImplementedError("exercise 01: write blockwise_absmax")


def normalize(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Every element scaled into [-1, 1] by its block's absmax (same length as ``flat``).

    Full blocks multiply by ``1 / absmax``, the short last block divides; a zero
    block stays zero; clamp the result to [-1, 1].
    """
    raise NotImplementedError("exercise 01: write normalize")


def nearest_codes(normalized: torch.Tensor) -> torch.Tensor:
    """uint8 index of the NF4 level nearest to each value (ties go to the lower level).

    Tip: the 15 midpoints between neighbouring levels split [-1, 1] into 16
    bins; ``torch.bucketize`` finds the bin of every value at once.
    """
    raise NotImplementedError("exercise 01: write nearest_codes")


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 bytes holding two 4-bit codes each: code ``2i`` in the high nibble of byte ``i``.

    An odd number of codes is padded with code 7 (the level 0.0).
    """
    raise NotImplementedError("exercise 01: write pack_codes")


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Given: NF4 quantization as the steps of the spec, each one a helper of yours."""
    check_weight(weight, blocksize)
    flat = weight.detach().reshape(-1).float()
    absmax = blockwise_absmax(flat, blocksize)
    codes = nearest_codes(normalize(flat, absmax, blocksize))
    q = NF4Tensor(pack_codes(codes), absmax, blocksize, weight.shape, weight.dtype)
    if double_quant:  # exercise 02 writes this part; until then keep your codes and borrow the reference's statistics
        ref = _reference_quantize(weight, blocksize, double_quant=True)
        q = NF4Tensor(q.packed, ref.absmax, blocksize, weight.shape, weight.dtype, True,
                      ref.absmax_code, ref.absmax_scale, ref.absmax_offset)
    return q


def dequantize_nf4(q: NF4Tensor) -> torch.Tensor:
    """A dense tensor of ``q.shape`` and ``q.dtype``: ``NF4_CODE[code] * absmax`` in fp32, rounded once.

    Unpack the HIGH nibble first, keep only ``q.numel`` codes (drop the padding),
    and take the per-block absmax from ``q.absmax_fp32()``.
    """
    raise NotImplementedError("exercise 01: write dequantize_nf4")


if __name__ == "__main__":  # python exercises/ex01_nf4.py grades this file alone
    import os

    from lora_lab.conformance.grading.command import main

    raise SystemExit(main(["--only", "01", "--path", os.path.dirname(os.path.abspath(__file__))]))
