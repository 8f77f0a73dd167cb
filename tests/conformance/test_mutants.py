"""Test the tests: every deliberately broken implementation in tests/mutants/ is rejected.

Each mutant breaks one realistic thing and names the check that must catch it
(``EXPECTED_FAILURE``). If a check stopped catching its mutant, the suite
would have gone blind to that mistake, and this test says so.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import Phase, settings

from lora_lab.conformance.isolation.target import Target
from lora_lab.conformance.runner import ERROR, FAILED, all_checks, run_check

MUTANTS = sorted(p for p in (Path(__file__).parents[1] / "mutants").glob("*.py") if p.stem != "__init__")
CHECKS = {c.name: c for c in all_checks()}


def load_mutant(path: Path):
    spec = importlib.util.spec_from_file_location(f"lora_lab_mutant_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def no_shrinking():
    """A rejection is all we need here: skip hypothesis' search for the smallest failing example.

    Shrinking helps a person read a failure; for a mutant under Triton's
    interpreter it costs over a thousand extra kernel runs.
    """
    previous = settings.get_current_profile_name()
    no_shrink = [Phase.explicit, Phase.reuse, Phase.generate]
    settings.register_profile("mutant-hunt", parent=settings.get_profile(previous), phases=no_shrink)
    settings.load_profile("mutant-hunt")
    yield
    settings.load_profile(previous)


@pytest.fixture(autouse=True)
def restore_global_state():
    """Some mutants change process-wide settings (the thread count, the RNG); the checks must see it, later tests must not."""
    rng, threads, dtype = torch.random.get_rng_state(), torch.get_num_threads(), torch.get_default_dtype()
    grad, deterministic = torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.random.set_rng_state(rng)
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
    torch.use_deterministic_algorithms(deterministic)


def test_there_are_enough_mutants():
    assert len(MUTANTS) >= 15, f"expected at least 15 mutants, found {len(MUTANTS)}"


@pytest.mark.parametrize("path", MUTANTS, ids=[p.stem for p in MUTANTS])
def test_suite_rejects_mutant(path):
    mutant = load_mutant(path)
    assert mutant.EXPECTED_FAILURE in CHECKS, f"{path.name} names an unknown check {mutant.EXPECTED_FAILURE!r}"
    result = run_check(CHECKS[mutant.EXPECTED_FAILURE], Target(path.stem, mutant))
    assert result.status in (FAILED, ERROR), (
        f"{mutant.EXPECTED_FAILURE} should reject {path.stem} ({mutant.__doc__.strip()}) but it {result.status}"
    )
    assert result.detail, "a rejection must say why"
