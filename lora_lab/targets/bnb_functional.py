"""bitsandbytes' functional API as it is: ``quantize_4bit``, ``dequantize_4bit`` and ``matmul_4bit``, in its own format.

``lora-lab verify lora_lab.targets.bnb_functional`` checks bitsandbytes itself,
the way a library author calls it: a weight is the ``(packed, QuantState)`` pair
that ``quantize_4bit`` returns, and ``dequantize_4bit`` is called on it as it is,
with no reshaping of ours. bitsandbytes' bytes *are* the interchange format, so
its interchange checks compare it with itself except for ``dequantize_4bit``'s
shape and values, which the oracle reads on the flattened weight; its semantic
results are the news.

Every line that is not a direct call of bitsandbytes:

- ``NF4_FORMAT.codes`` unpacks the packed bytes, two codes per byte, high nibble first;
- ``NF4_FORMAT.to_nf4`` / ``from_nf4`` convert to and from lora_lab's ``NF4Tensor``
  (``NF4Tensor.from_bnb`` / ``to_bnb``: field renames, no arithmetic);
- every call runs under ``torch.compiler.set_stance("force_eager")``: bitsandbytes
  ``torch.compile``s its CPU dequantizer, and recompiling for each drawn shape
  costs minutes (the eager path is the one compile traces, the same arithmetic);
- ``qlora_linear`` adds the LoRA path in torch: ``scaling * (x @ A^T) @ B^T`` with A
  and B cast to x's dtype, as peft's LoRA layer computes it on a bitsandbytes base.
"""

from __future__ import annotations

import math

import torch

from lora_lab.nf4 import NF4Tensor, unpack_codes
from lora_lab.targets.libraries import bitsandbytes_eager

LIBRARIES = ("bitsandbytes",)
SELF_COMPARISONS = {  # checks whose oracle is bitsandbytes itself: a pass shows determinism only
    "nf4.bytes_match_bitsandbytes": "bitsandbytes' quantize_4bit on both sides",
    **{name: "bitsandbytes' quantize_4bit on both sides" for name in (
        "nf4.double_quant_offset", "nf4.double_quant_scales", "nf4.double_quant_codes", "nf4.double_quant_grid_table")},
    "qlora.matches_peft_bitsandbytes": "bitsandbytes' 4-bit matmul on both sides, peft's LoRA path on one",
}


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False):
    """``bitsandbytes.functional.quantize_4bit(weight, blocksize, quant_type="nf4", compress_statistics=double_quant)``."""
    import bitsandbytes.functional as bnb_functional

    with bitsandbytes_eager():
        return bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def dequantize_nf4(q) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit(packed, quant_state)``."""
    import bitsandbytes.functional as bnb_functional

    packed, state = q
    with bitsandbytes_eager():
        return bnb_functional.dequantize_4bit(packed, state)


def qlora_linear(x, weight, lora_A, lora_B, scaling: float, bias=None) -> torch.Tensor:
    """``bitsandbytes.matmul_4bit(x, packed.t(), quant_state, bias)`` (as ``Linear4bit`` calls it) plus the LoRA path."""
    import bitsandbytes as bnb

    packed, state = weight
    with bitsandbytes_eager():
        y = bnb.matmul_4bit(x, packed.t(), quant_state=state, bias=bias)
    return y + scaling * torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A.to(x.dtype)), lora_B.to(x.dtype))


class BitsandbytesFormat:
    """The ``(packed, QuantState)`` pair, read through bitsandbytes' own fields."""

    name = "bitsandbytes (packed, QuantState)"
    quantize = staticmethod(quantize_nf4)
    dequantize = staticmethod(dequantize_nf4)

    @staticmethod
    def codes(q) -> torch.Tensor:
        packed, state = q
        return unpack_codes(packed.reshape(-1), math.prod(state.shape)).to(torch.int64)  # bitsandbytes' byte layout

    @staticmethod
    def levels(q) -> torch.Tensor:
        return q[1].code

    @staticmethod
    def absmax(q) -> torch.Tensor:
        """The per-block absmax as ``dequantize_4bit`` uses it: decoded with ``dequantize_blockwise`` when nested."""
        import bitsandbytes.functional as bnb_functional

        state = q[1]
        if not state.nested:
            return state.absmax
        with bitsandbytes_eager():
            return bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset

    @staticmethod
    def to_nf4(q) -> NF4Tensor:
        return NF4Tensor.from_bnb(*q)

    @staticmethod
    def from_nf4(q: NF4Tensor):
        return q.to_bnb()


NF4_FORMAT = BitsandbytesFormat()
