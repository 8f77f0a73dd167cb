"""The real stack, built to hold exactly the same numbers as a drawn problem.

peft's LoRA on a bitsandbytes ``Linear4bit`` is what people fine-tune with; the
conformance suite compares against it layer by layer. The layer is kept in
train mode: in eval mode bitsandbytes' CPU path repacks the weight and computes
approximately in bf16 (on a CPU with AVX512-BF16).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from types import ModuleType

import torch
from torch import nn

from lora_lab.nf4 import NF4Tensor


def bitsandbytes_eager():
    """bitsandbytes torch.compile()s its fallback dequantizer; recompiling for every drawn shape would dominate.

    Where TorchDynamo was never imported nothing can have been compiled (``bitsandbytes()`` imports it so), and
    ``set_stance`` would import it: 2 s for nothing."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if set_stance is None or "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()
    return set_stance("force_eager")


def bitsandbytes() -> ModuleType:
    """The bitsandbytes package, imported as the oracles run it: eager.

    At import bitsandbytes wraps four of its CPU functions in ``torch.compile``, and
    registers its ops with ``torch.library``, which wraps each kernel so that TorchDynamo
    does not trace into it. Both import TorchDynamo and Inductor, the one at once, the
    other at the first call: 6 of the 7 s that grading exercise 01 spent on bitsandbytes
    on 2 cores. The oracles never compile: every call is eager (``bitsandbytes_eager()``
    is ``force_eager``, where a compiled function runs its original Python). So, where
    bitsandbytes is not imported yet, both wrappers are the identity while it imports:
    each op runs bitsandbytes' own function, eagerly, as it would under ``force_eager``.
    Where Triton is not imported yet, bitsandbytes sees none: it imports Triton (0.4 s)
    only for its Intel XPU kernels.
    """
    if "bitsandbytes" not in sys.modules:
        compile_, disable_dynamo = torch.compile, torch._disable_dynamo
        torch.compile = lambda fn=None, **options: fn if fn is not None else (lambda f: f)
        torch._disable_dynamo = lambda fn=None, recursive=True: fn if fn is not None else (lambda f: f)
        hide_triton = "triton" not in sys.modules
        if hide_triton:
            sys.modules["triton"] = None  # import triton raises ImportError
        try:
            importlib.import_module("bitsandbytes")
        finally:
            torch.compile, torch._disable_dynamo = compile_, disable_dynamo
            if hide_triton:
                del sys.modules["triton"]
    return sys.modules["bitsandbytes"]


def peft_module() -> ModuleType:
    """peft, after bitsandbytes (which peft imports) is imported eagerly (``bitsandbytes``)."""
    bitsandbytes()
    return importlib.import_module("peft")


STACK_MODULE = "lora_lab.conformance.stack_oracle"
_STACK: dict = {}


def stack(preload: tuple[str, ...] = ()):
    """The oracles that need peft, bitsandbytes or transformers (``stack_oracle``), in a process of their own
    (``isolation.RemoteTarget``), for the checks that name what they need in ``Check.stack``.

    Importing peft takes 5-7 s on 2 cores, transformers about 3 s. Started early (``start_stack``), that process
    imports ``preload`` on the core the suite and the target's process leave idle while they take turns, so the
    suite itself never imports them for these checks. Started once, it serves every check until ``close_stack``.
    """
    from lora_lab.conformance.isolation import RemoteTarget

    if "target" not in _STACK:
        _STACK["target"] = RemoteTarget(STACK_MODULE, name="peft, bitsandbytes and transformers (the oracles)",
                                        wait=False, preload=preload)
    return _STACK["target"]


def start_stack(checks) -> None:
    """Start ``stack()``'s process now, without waiting, importing what ``checks`` will need there."""
    preload = tuple(dict.fromkeys(module for check in checks for module in check.stack))
    if preload:
        stack(preload)


def close_stack() -> None:
    target = _STACK.pop("target", None)
    if target is not None:
        target.close()


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
