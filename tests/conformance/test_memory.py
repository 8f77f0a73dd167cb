"""Record.alive skips the garbage collection only when it cannot change the answer."""

import gc

import torch

from lora_lab.conformance.judge.memory import measure


class _Cycle:
    """Keeps a tensor alive through a reference cycle only: plain reference counting never frees it."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.me = tensor, self


def test_nothing_alive_is_reported_as_nothing_alive():
    with measure(lambda n: n >= 1000) as record:
        torch.ones(1000) * 2
    assert len(record.created) == 2 and record.alive() == []


def test_a_tensor_still_referenced_is_reported():
    with measure(lambda n: n >= 1000) as record:
        kept = torch.ones(1000) * 2
    assert [s.shape for s in record.alive()] == [(1000,)]
    del kept


def test_a_tensor_held_only_by_garbage_in_a_cycle_is_collected_not_reported():
    gc.disable()  # so that only alive() can collect the cycle
    try:
        with measure(lambda n: n >= 1000) as record:
            _Cycle(torch.ones(1000) * 2)
        assert record._refs[-1][1]() is not None, "the cycle should still hold the tensor before a collection"
        assert record.alive() == []
    finally:
        gc.enable()
