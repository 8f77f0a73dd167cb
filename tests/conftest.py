"""Test configuration: hypothesis profiles come from lora_lab.conformance.judge.profiles.

Choose one with ``--hypothesis-profile=ci|dev|thorough`` (the README's test
command uses ``ci``: derandomized, no deadline); the default here is ``dev``.
"""

import os

import pytest
import torch
from hypothesis import settings

import lora_lab.conformance.judge.profiles  # noqa: F401  (registers the profiles)

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
pytest_plugins = ["pytester"]

# Two cores, often shared: OpenMP threads spin-waiting on a busy machine made single steps 100x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def batch():
    """Four price prompts from the synthetic catalogue, collated (labels: -100 except the price)."""
    from lora_lab.data import collate, generate_products

    return collate(generate_products(4, seed=3))
