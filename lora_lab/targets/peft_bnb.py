"""The canonical stack as a conformance target: bitsandbytes NF4, peft LoRA, transformers' loss, torch's AdamW.

``lora-lab verify lora_lab.targets.peft_bnb`` shows that the suite accepts a
correct implementation that lora_lab did not write. The numerics are
entirely theirs; this module only translates calling conventions, plus:

- the protocol's input validation (bitsandbytes quantizes NaN weights and
  peft broadcasts a wrong-length bias without complaint), borrowed from
  lora_lab so the error-handling checks measure the adapter, not the stack;
- dequantization on the flattened weight, because bitsandbytes 0.50's CPU C
  kernel indexes blocks per row when a row is not a multiple of the block size.

It does not provide ``apply_qlora`` / ``training_step``: peft keeps each
layer's adapters in ``ModuleDict``s keyed by adapter name, which does not fit
the protocol's ``module.lora_A`` tensors. The whole-step comparison with peft +
bitsandbytes is the check ``training.matches_peft_bitsandbytes`` instead, which
every target's training step must pass.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_lab.loss import check_loss_inputs
from lora_lab.nf4 import NF4Tensor, check_weight
from lora_lab.operands import check_qlora_operands


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    import bitsandbytes.functional as bnb_functional

    check_weight(weight, blocksize)
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant
    )
    return NF4Tensor.from_bnb(packed, state)


def dequantize_nf4(q: NF4Tensor) -> torch.Tensor:
    from lora_lab.conformance.oracles import bnb_dequantize

    return bnb_dequantize(q)


def qlora_linear(x, weight: NF4Tensor, lora_A, lora_B, scaling: float, bias=None) -> torch.Tensor:
    """peft's LoRA layer on a bitsandbytes Linear4bit, called with the given A, B and bias as its parameters."""
    import peft

    from lora_lab.conformance.oracles import bnb_linear4bit

    check_qlora_operands(x, weight, lora_A, lora_B, bias, scaling)
    r = lora_A.shape[0]
    holder = nn.Module()
    holder.proj = bnb_linear4bit(weight, None, compute_dtype=x.dtype)
    config = peft.LoraConfig(r=r, lora_alpha=scaling * r, target_modules=["proj"], lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):  # peft initialises adapters we replace at once: leave the caller's RNG alone
        layer = peft.get_peft_model(holder, config).base_model.model.proj
    layer.scaling["default"] = scaling
    layer.to(x.dtype).train()
    parameters = {"lora_A.default.weight": lora_A.to(x.dtype), "lora_B.default.weight": lora_B.to(x.dtype)}
    y = torch.func.functional_call(layer, parameters, (x,), strict=False)
    return y if bias is None else y + bias.to(x.dtype)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """transformers' own causal-LM loss (it shifts internally); it returns NaN when no label counts, so check first."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    check_loss_inputs(logits, labels, ignore_index)
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], ignore_index=ignore_index)


def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01) -> None:
    """One step of torch.optim.AdamW on ``param``, with the moment buffers supplied by the caller.

    torch counts steps in its own state and never sees a step 0; the contract's ``step`` comes from the caller,
    so this adapter refuses one below 1 (torch would divide by 1 - beta ** 0 = 0).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"expected step to be the update's number, counting from 1, got {step!r}")
    optimizer = torch.optim.AdamW([param], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
    optimizer.state[param] = {
        "step": torch.tensor(float(step - 1)),
        "exp_avg": exp_avg,
        "exp_avg_sq": exp_avg_sq,
    }
    previous, param.grad = param.grad, grad
    with torch.no_grad():
        optimizer.step()
    param.grad = previous
