"""torchao's NF4 as torchtune uses it: ``to_nf4``, ``linear_nf4``, and the low-rank path of torchtune's ``LoRALinear``.

``lora-lab verify lora_lab.targets.torchao_nf4`` checks torchao's own
``NF4Tensor`` (pure torch, runs on the CPU) for semantic conformance: it is not
bitsandbytes' storage (its absmax is double-quantized by a linear int8 scheme,
its 16 levels are kept in the weight's dtype), so it claims no interchange level.

Every line that is not a direct call of torchao:

- ``quantize_nf4`` picks ``scaler_block_size``, the number of blocks whose absmax
  share one int8 scale: torchao's default, 256, when the block count allows it, else
  the largest power of two that divides the block count (torchao asserts that it
  does); and refuses ``double_quant=False`` with a ValueError, since torchao always
  double-quantizes (``CAPABILITIES`` says so, so the suite asks only for True);
- ``qlora_linear`` is torchtune's ``LoRALinear.forward`` with ``quantize_base=True``:
  ``linear_nf4(x, W)``, plus the bias, plus ``scaling * lora_b(lora_a(x))`` as two
  ``F.linear`` calls, A and B cast to x's dtype;
- ``NF4_FORMAT.codes`` unpacks torchao's ``quantized_data``, two codes per byte,
  high nibble first; ``absmax`` is torchao's own ``dequantize_scalers``.
"""

from __future__ import annotations

import torch
from torch.nn import functional

from lora_lab.nf4 import unpack_codes

LIBRARIES = ("torchao",)
CAPABILITIES = {"double_quant": ((True,), "torchao always double-quantizes the absmax (int8, one scale per block of scalers)")}


def _scaler_block_size(blocks: int) -> int:
    size = 256
    while blocks % size:
        size //= 2
    return size


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    """``torchao``'s ``to_nf4(weight, block_size, scaler_block_size)``."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    if not double_quant:
        raise ValueError("expected double_quant=True: torchao's NF4Tensor always double-quantizes its absmax")
    return to_nf4(weight, block_size=blocksize, scaler_block_size=_scaler_block_size(max(1, weight.numel() // blocksize)))


def dequantize_nf4(q) -> torch.Tensor:
    """torchao's ``NF4Tensor.get_original_weight()``."""
    return q.get_original_weight()


def qlora_linear(x, weight, lora_A, lora_B, scaling: float, bias=None) -> torch.Tensor:
    """torchtune's LoRALinear on an NF4 base: ``linear_nf4(x, W) + bias + scaling * lora_b(lora_a(x))``."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

    out = linear_nf4(input=x, weight=weight)
    if bias is not None:
        out = out + bias
    return out + scaling * functional.linear(functional.linear(x, lora_A.to(x.dtype)), lora_B.to(x.dtype))


class TorchaoFormat:
    """torchao's ``NF4Tensor``, read through its own fields."""

    name = "torchao NF4Tensor"
    quantize = staticmethod(quantize_nf4)
    dequantize = staticmethod(dequantize_nf4)

    @staticmethod
    def codes(q) -> torch.Tensor:
        return unpack_codes(q.quantized_data.reshape(-1), q.numel()).to(torch.int64)  # bitsandbytes' byte layout

    @staticmethod
    def levels(q) -> torch.Tensor:
        return q.nf4

    @staticmethod
    def absmax(q) -> torch.Tensor:
        return q.dequantize_scalers(q.quantized_scalers, q.quantization_factor, q.scaler_block_size).float()


NF4_FORMAT = TorchaoFormat()
