"""command_profile runs a command's checks on $LORA_LAB_THREADS torch threads (default 1) and gives the count back."""

import pytest
import torch

from lora_lab.conformance.judge.profiles import THREADS_ENV, command_profile, command_threads


@pytest.fixture
def two_threads():
    """Start from a count that is neither 1 nor the values the tests ask for, and put torch back as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_checks_run_on_one_thread_and_the_count_comes_back(monkeypatch, two_threads):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    with command_profile("ci"):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_the_count_comes_back_when_a_check_raises(monkeypatch, two_threads):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    with pytest.raises(RuntimeError), command_profile("ci"):
        raise RuntimeError("a check went wrong")
    assert torch.get_num_threads() == 2


def test_the_environment_asks_for_more_or_for_torchs_default(monkeypatch, two_threads):
    monkeypatch.setenv(THREADS_ENV, "3")
    with command_profile("ci"):
        assert torch.get_num_threads() == 3
    monkeypatch.setenv(THREADS_ENV, "0")
    with command_profile("ci"):
        assert torch.get_num_threads() == 2  # 0: left as it was


@pytest.mark.parametrize("text", ["-1", "two", ""])
def test_a_bad_value_says_what_is_expected_before_anything_changes(monkeypatch, two_threads, text):
    monkeypatch.setenv(THREADS_ENV, text)
    with pytest.raises(ValueError, match="whole number of threads"):
        command_threads()
    with pytest.raises(ValueError, match=THREADS_ENV), command_profile("ci"):
        pass
    assert torch.get_num_threads() == 2
