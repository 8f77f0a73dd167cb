"""The oracles that need peft, bitsandbytes or transformers, served from a process of their own (``isolation.stack``).

Importing peft (and transformers, which it imports) takes 5-7 s on 2 cores, transformers alone about 3 s: in the
suite's own process that is time a learner waits for. This module is loaded as a target by a process of its own,
started with ``grade`` and ``verify``, which first imports what the selected checks name in ``Check.stack``: on
the core that the suite and the target's process leave idle while they take turns. Nothing of a target ever runs
here, and every number comes from the libraries' own code:

- ``qlora_linear``: ``lora_lab.targets.peft_bnb``'s, peft's LoRA on a bitsandbytes ``Linear4bit`` holding the
  weight's bytes (gradients of x, A and B through peft's own modules);
- ``ORACLE["transformers_loss"]``: ``LlamaForCausalLM``'s logits and its own loss (``labels=...``) on
  ``tiny_llama(seed)``.

The process holds every call to the contract that a target's does (``call_probes``), so an oracle that changed
global state or wrote its inputs would fail the check, not mislead it.
"""

from __future__ import annotations

import functools
import sys

import torch

# torchao, where it is installed (the compat extra), is imported by peft and transformers only to offer LoRA on its
# own tensor types: a second of this process's start-up that none of these oracles uses. (This module is imported
# only in that process; the suite's own would lose torchao for its torchao targets.)
if "torchao" not in sys.modules:
    sys.modules["torchao"] = None  # import torchao raises ImportError, and find_spec says it is not there

def qlora_linear(x, weight, lora_A, lora_B, scaling: float, bias=None) -> torch.Tensor:
    """peft's LoRA on a bitsandbytes Linear4bit (``lora_lab.targets.peft_bnb.qlora_linear``)."""
    from lora_lab.targets.peft_bnb import qlora_linear as peft_on_bitsandbytes

    return peft_on_bitsandbytes(x, weight, lora_A, lora_B, scaling, bias)


@functools.cache
def _tiny_llama(seed: int):
    from lora_lab.model import tiny_llama

    with torch.random.fork_rng(devices=[]):  # the global RNG stays the caller's
        return tiny_llama(seed=seed)


def transformers_loss(seed: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tiny_llama(seed)(input_ids, attention_mask, labels=labels)``: its logits and transformers' own loss."""
    with torch.no_grad():
        out = _tiny_llama(int(seed))(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    return out.logits, out.loss


ORACLE = {"transformers_loss": transformers_loss}
