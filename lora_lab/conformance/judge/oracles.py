"""The real stack, built to hold exactly the same numbers as a drawn problem.

peft's LoRA on a bitsandbytes ``Linear4bit`` is what people fine-tune with; the
conformance suite compares against it layer by layer. The layer is kept in
train mode: in eval mode bitsandbytes' CPU path repacks the weight and computes
approximately in bf16 (on a CPU with AVX512-BF16).
"""

from __future__ import annotations

import torch
from torch import nn

from lora_lab.nf4 import NF4Tensor
from lora_lab.targets.libraries import bitsandbytes, bitsandbytes_eager, peft_module


def bnb_dequantize(q: NF4Tensor) -> torch.Tensor:
    """bitsandbytes' ``dequantize_4bit`` of ``q``, on the flattened weight.

    bitsandbytes 0.50's CPU C kernel indexes blocks per row when a row is not a
    multiple of the block size; its torch and CUDA paths (and the NF4 format)
    index the flattened weight, so that is how it is asked.
    """
    bnb_functional = bitsandbytes().functional
    flat = NF4Tensor(
        q.packed, q.absmax, q.blocksize, torch.Size([q.numel]), q.dtype, q.double_quant,
        q.absmax_code, q.absmax_scale, q.absmax_offset,
    )
    packed, state = flat.to_bnb()
    with bitsandbytes_eager():
        return bnb_functional.dequantize_4bit(packed, state).reshape(q.shape)


def bnb_linear4bit(weight: NF4Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``weight``'s exact bytes (no re-quantization)."""
    bnb = bitsandbytes()
    n_out, k_in = weight.shape
    layer = bnb.nn.Linear4bit(
        k_in, n_out, bias=bias is not None, compute_dtype=compute_dtype, quant_type="nf4",
        compress_statistics=weight.double_quant, device="meta",
    )
    packed, state = weight.to_bnb()
    layer.weight = bnb.nn.Params4bit(
        data=packed, requires_grad=False, quant_state=state, blocksize=weight.blocksize,
        compress_statistics=weight.double_quant, quant_type="nf4", bnb_quantized=True,
    )
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


def peft_bnb_layer(problem) -> tuple[nn.Module, NF4Tensor]:
    """peft's LoRA layer around a bitsandbytes Linear4bit, with the problem's W, A, B, bias and scaling."""
    peft = peft_module()
    r = problem.lora_A.shape[0]
    holder = nn.Module()
    holder.proj = bnb_linear4bit(problem.weight, problem.bias)
    config = peft.LoraConfig(r=r, lora_alpha=problem.scaling * r, target_modules=["proj"], lora_dropout=0.0)
    model = peft.get_peft_model(holder, config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(problem.lora_A.float())
        layer.lora_B["default"].weight.copy_(problem.lora_B.float())
    layer.scaling["default"] = problem.scaling  # exactly, not alpha/r re-rounded
    model.train()
    return layer, problem.weight
