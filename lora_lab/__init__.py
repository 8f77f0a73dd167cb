"""lora_lab: learn, check and speed up QLoRA fine-tuning.

The reference follows the lecture's four steps of one QLoRA training step:
forward pass (``model``), loss (``loss``), backward pass and optimization
(``optim``, ``train``), on a base model frozen in NF4 (``nf4``) with LoRA
adapters (``lora``).
"""

__version__ = "0.1.0"
