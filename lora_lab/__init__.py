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
import logging
import os
import sys

__version__ = "0.2.0"
# How many CPU threads torch uses in lora-lab's commands and in the targets' processes (cli/threads.py, profiles.py).
THREADS_ENV = "LORA_LAB_THREADS"

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


# Warnings the stack logs on import that read like failures but change nothing lora_lab computes: (logger, the start
# of the message). bitsandbytes on an AVX512-BF16 CPU tries to fetch a faster gemm_4bit from the Hugging Face Hub and
# falls back to its own kernel; torchao's wheel carries CUDA extensions a CPU cannot load; torchao registers an Enum
# with torch's pytree in a way torch 2.13 calls deprecated.
KNOWN_LIBRARY_NOISE = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    ("torchao", "Failed to load "),
    ("torch.utils._pytree", "%s is an Enum subclass and is now natively supported"),
)


class _DropKnownNoise(logging.Filter):
    """Drops one logger's records whose (unformatted) message starts with a known prefix; every other record passes."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _quiet_known_library_noise() -> None:
    """Keep the stack's harmless import-time warnings out of lora_lab's output (LORA_LAB_LIBRARY_NOISE=1 shows them).

    A filter on each named logger, set before the library is imported, drops only those messages: a new warning
    from the same library still prints.
    """
    if os.environ.get("LORA_LAB_LIBRARY_NOISE") == "1":
        return
    for name, prefix in KNOWN_LIBRARY_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropKnownNoise(prefix))


_quiet_known_library_noise()


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lora_lab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
