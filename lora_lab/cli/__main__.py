"""``python -m lora_lab.cli``: the same as the ``lora-lab`` command (torchrun launches ``train`` this way)."""

from lora_lab.cli import console

console()
