"""lora_lab: learn, check and speed up QLoRA fine-tuning.

The reference follows the lecture's four steps of one QLoRA training step on a
base model frozen in NF4 (``nf4``) with LoRA adapters (``lora``):

1. forward pass  (``model``, ``train.forward``)
2. loss          (``loss.next_token_loss``)
3. backward pass (``train.backward``: gradients reach only the adapters)
4. optimization  (``optim.adamw_step``, ``train.optimize``)

``import lora_lab`` is cheap: the public names below are imported on first use,
so ``lora_lab`` itself is a conformance target (``lora-lab verify lora_lab``).
"""

from __future__ import annotations

import importlib
import os
import sys

__version__ = "0.1.0"

_EXPORTS = {
    "NF4_CODE": "lora_lab.nf4",
    "NF4Tensor": "lora_lab.nf4",
    "quantize_nf4": "lora_lab.nf4",
    "dequantize_nf4": "lora_lab.nf4",
    "qlora_linear": "lora_lab.lora",
    "QLoRALinear": "lora_lab.lora",
    "NF4Linear": "lora_lab.lora",
    "tiny_llama": "lora_lab.model",
    "apply_qlora": "lora_lab.model",
    "next_token_loss": "lora_lab.loss",
    "adamw_step": "lora_lab.optim",
    "training_step": "lora_lab.train",
}

__all__ = sorted(_EXPORTS)


def _interpret_triton_without_a_gpu() -> None:
    """On a machine with no GPU, run Triton kernels under its interpreter: set TRITON_INTERPRET=1 early.

    Triton reads the variable when it is imported, and bitsandbytes imports
    Triton as soon as it is imported itself, so lora_lab.kernels setting it on
    its own import would often be too late. Checking the device files is
    instant (importing torch to ask would not be).
    """
    if "triton" in sys.modules or "TRITON_INTERPRET" in os.environ:
        return
    if not any(os.path.exists(device) for device in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")):
        os.environ["TRITON_INTERPRET"] = "1"


_interpret_triton_without_a_gpu()


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lora_lab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
