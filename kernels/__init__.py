"""Triton kernels for QLoRA, imported as ``lora_lab.kernels``."""
