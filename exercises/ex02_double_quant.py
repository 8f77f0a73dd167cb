"""Exercise 02: double quantization, quantizing the quantization constants.

Lecture step 1, the forward pass (the storage it reads). With NF4 alone every
block of 64 weights carries one fp32 absmax: 32 / 64 = 0.5 extra bits per
weight. QLoRA's *double quantization* stores those absmax values in 8 bits
too, with one fp32 scale per 256 of them:

    8 / 64 + 32 / (64 * 256) = 0.127 bits per weight,  saving 0.373 bits per weight

For Llama 3.1 8B that is about 370 MB less, for a loss of precision in the
scales that the round-trip check of exercise 01 bounds.

The idea
--------
The absmax values are all positive and similar, so first centre them on their
mean (the *offset*) and then quantize the centred values blockwise, 256 per
block, onto bitsandbytes' 8-bit *dynamic* map, ``lora_lab.nf4.dynamic_map()``:
256 signed levels, dense near zero and sparse near +-1 (a tiny floating-point
format: the exponent gets the bits).

    offset       = mean(absmax)                                   one fp32 number
    centred      = absmax - offset
    scale[g]     = max |centred| over group g of 256 consecutive blocks
    v            = centred * (1 / scale[g])                       in [-1, 1]
    code[b]      = index (uint8) of the dynamic-map level for v   (see below)
    absmax[b]   ~= dynamic_map()[code[b]] * scale[g] + offset     what NF4Tensor.absmax_fp32() decodes

The spec (bitsandbytes' bytes)
------------------------------
The grader compares with ``bitsandbytes.functional.quantize_4bit(...,
compress_statistics=True)``: the uint8 codes, the fp32 scales, the offset and
the map itself must be identical. Two details decide the last bit:

* **The 65,536-point grid.** bitsandbytes' CPU kernel does not search for the
  level nearest to ``v`` itself. It first snaps ``v`` to a grid of 65,536
  points over [-1, 1], computed in fp32 exactly like this:

      i = int(((clamp(v, -1, 1) + 1.0) * 0.5) * 65535.0 + 0.5)      (truncation toward zero)

  and then takes the level nearest to grid point ``i``, whose value is
  ``i / 65535.0 * 2 - 1`` (fp32, in that order). A table of 65,536 uint8 entries
  (``nearest_level_table``) does that lookup for every value at once; on a tie
  between two levels the lower index wins (``argmin`` returns the first).
* **An all-equal group.** If the 256 absmax values of a group are equal,
  their centred values are all 0 and the scale is 0: ``0 * (1 / 0)`` is NaN, and
  bitsandbytes stores code 0 for it. Do the same (``torch.nan_to_num``).

Every group, including a short last one, multiplies by ``1 / scale`` (unlike
exercise 01, there is no division for the short group).

``quantize_nf4`` below is written: it takes the single-quantized weight (the
reference's, or your own from exercise 01 if you change the import) and
double-quantizes its absmax with your two functions. ``dynamic_map()`` may be
imported; building it is not part of this exercise.

Grading: ``lora-lab grade --only 02`` (or ``python exercises/ex02_double_quant.py``).

The reference solution is lora_lab/nf4.py (``_dynamic_lookup`` and
``quantize_absmax``). Try first!
"""

from __future__ import annotations

import torch

from lora_lab.nf4 import NF4Tensor, dynamic_map
from lora_lab.nf4 import quantize_nf4 as quantize_single  # or: from ex01_nf4 import quantize_nf4 as quantize_single

ABSMAX_BLOCKSIZE = 256  # absmax values that share one fp32 scale


def nearest_level_table(levels: torch.Tensor) -> torch.Tensor:
    """uint8 table of 65,536 entries: entry i is the index of the level nearest to grid point i / 65535 * 2 - 1.

    ``levels`` is the sorted 256-entry dynamic map. Ties go to the lower index.
    """
    raise NotImplementedError("exercise 02: write nearest_level_table")


def double_quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(codes, scales, offset)``: uint8 codes (one per absmax), fp32 scales (one per 256), the fp32 mean as a float.

    Follow the formulas and the two details in the spec above.
    """
    raise NotImplementedError("exercise 02: write double_quantize_absmax")


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Given: single NF4 quantization, then your double quantization of its absmax."""
    q = quantize_single(weight, blocksize)
    if not double_quant:
        return q
    codes, scales, offset = double_quantize_absmax(q.absmax)
    return NF4Tensor(q.packed, codes, blocksize, q.shape, q.dtype, True, dynamic_map(), scales, offset)


if __name__ == "__main__":  # python exercises/ex02_double_quant.py grades this file alone
    import os

    from lora_lab.conformance.grading.command import main

    raise SystemExit(main(["--only", "02", "--path", os.path.dirname(os.path.abspath(__file__))]))
