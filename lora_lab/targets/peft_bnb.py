"""peft's LoRA on a bitsandbytes ``Linear4bit``, and bitsandbytes' NF4, in lora_lab's interchange type (NF4Tensor).

``lora-lab verify lora_lab.targets.peft_bnb`` shows what the suite says of the
canonical stack, spoken through ``NF4Tensor``. Every number it returns comes from
peft's or bitsandbytes' own code, never from the suite's oracles
(``lora_lab.conformance.judge.oracles``), and bad input meets their own checks, not ours.

Every line that is not a direct call of bitsandbytes or peft:

- ``NF4Tensor.from_bnb`` / ``to_bnb`` rename fields between bitsandbytes'
  ``(packed, QuantState)`` and ``NF4Tensor`` (no arithmetic);
- ``dequantize_nf4`` reshapes ``dequantize_4bit``'s result to the weight's shape
  (bitsandbytes returns (1, n) for a 1-D weight and (2, 1) for a (1, 2) one); it
  asks bitsandbytes with the weight's own shape, where the oracle flattens it;
- ``qlora_linear`` builds the ``Linear4bit`` from the NF4Tensor's bytes with
  bitsandbytes' ``Params4bit.from_prequantized``, wraps it with peft's
  ``get_peft_model``, sets peft's ``scaling`` to the exact value, takes the weight's
  dtype as the compute dtype (as a user sets ``bnb_4bit_compute_dtype``), and passes
  A, B and bias (in x's dtype) through ``torch.func.functional_call``, and keeps
  the caller's RNG (``fork_rng``: peft draws the initial adapters it replaces);
- bitsandbytes and peft are imported with the module, bitsandbytes as the oracles import it
  (``targets.libraries.bitsandbytes``: its functions eager, never wrapped for ``torch.compile``), and every
  bitsandbytes call runs under ``torch.compiler.set_stance("force_eager")`` (bitsandbytes compiles
  its CPU dequantizer; recompiling per drawn shape costs minutes).

Not provided: ``next_token_loss`` and ``adamw_step``. Their oracles are
transformers' loss and ``torch.optim.AdamW``, the very code this stack would call,
so those checks would compare a library with itself.

``SELF_COMPARISONS`` lists the checks whose oracle is the library itself here;
their results are reported as such, since passing them shows determinism only.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_lab.nf4 import NF4Tensor
from lora_lab.targets.libraries import bitsandbytes, bitsandbytes_eager, peft_module

# At import, as a library is: a process serving this target (the suite's own oracle among them, isolation.stack)
# spends its start-up on them rather than its first call.
bnb = bitsandbytes()
peft = peft_module()

LIBRARIES = ("bitsandbytes", "peft")
SELF_COMPARISONS = {
    "nf4.bytes_match_bitsandbytes": "bitsandbytes' quantize_4bit on both sides",
    **{name: "bitsandbytes' quantize_4bit on both sides" for name in (
        "nf4.double_quant_offset", "nf4.double_quant_scales", "nf4.double_quant_codes", "nf4.double_quant_grid_table")},
    "qlora.matches_peft_bitsandbytes": "peft on a bitsandbytes Linear4bit on both sides (built two ways)",
}


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """``bitsandbytes.functional.quantize_4bit(weight, blocksize, "nf4", compress_statistics=double_quant)``."""
    with bitsandbytes_eager():
        packed, state = bnb.functional.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4",
                                                     compress_statistics=double_quant)
    return NF4Tensor.from_bnb(packed, state)


def dequantize_nf4(q: NF4Tensor) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit`` of the weight's own bytes and QuantState."""
    with bitsandbytes_eager():
        return bnb.functional.dequantize_4bit(*q.to_bnb()).reshape(q.shape)


def qlora_linear(x, weight: NF4Tensor, lora_A, lora_B, scaling: float, bias=None) -> torch.Tensor:
    """peft's LoRA layer on a bitsandbytes Linear4bit holding the weight's bytes, with A, B and bias as its parameters."""
    packed, state = weight.to_bnb()
    n_out, k_in = weight.shape
    base = bnb.nn.Linear4bit(k_in, n_out, bias=bias is not None, compute_dtype=weight.dtype, quant_type="nf4", device="meta")
    base.weight = bnb.nn.Params4bit.from_prequantized(packed, state.as_dict(packed=True), device=packed.device, module=base)
    holder = nn.Module()
    holder.proj = base
    r = lora_A.shape[0]
    config = peft.LoraConfig(r=r, lora_alpha=scaling * r, target_modules=["proj"], lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):  # peft initialises adapters we replace at once: leave the caller's RNG alone
        layer = peft.get_peft_model(holder, config).base_model.model.proj
    layer.scaling["default"] = scaling  # exactly, not alpha / r re-rounded
    layer.train()  # bitsandbytes' eval mode on the CPU computes approximately (a known finding)
    parameters = {"lora_A.default.weight": lora_A.to(x.dtype), "lora_B.default.weight": lora_B.to(x.dtype)}
    if bias is not None:
        parameters["base_layer.bias"] = bias.to(x.dtype)
    with bitsandbytes_eager():
        return torch.func.functional_call(layer, parameters, (x,), strict=False)
