"""``python -m lora_lab.cli``: the same as the ``lora-lab`` command (torchrun launches ``train`` this way)."""

import sys

from lora_lab.cli import main

sys.exit(main())
