"""Test configuration: hypothesis profiles come from lora_lab.conformance.profiles.

Choose one with ``--hypothesis-profile=ci|dev|thorough`` (the README's test
command uses ``ci``: derandomized, no deadline); the default here is ``dev``.
"""

import os

import torch
from hypothesis import settings

import lora_lab.conformance.profiles  # noqa: F401  (registers the profiles)

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
pytest_plugins = ["pytester"]

# Two cores, often shared: OpenMP threads spin-waiting on a busy machine made single steps 100x slower.
torch.set_num_threads(1)
