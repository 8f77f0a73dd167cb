"""Record.alive skips the garbage collection only when it cannot change the answer; the process census sees what no
model reaches."""

import gc

import torch

from lora_lab.conformance.judge.memory import measure, reachable_storages, storages_alive, stray_weights


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


def test_the_census_finds_a_new_tensor_of_a_weight_size_that_no_model_reaches():
    model = torch.nn.Linear(48, 40)
    before = storages_alive(collect=False)
    hidden = {"copy": model.weight.detach().clone()}  # 1,920 elements, out of the model's reach
    reachable: dict[int, int] = {}
    reachable_storages(model, reachable)
    found = stray_weights(before, set(reachable), {48 * 40})
    assert [s.shape for s in found] == [(40, 48)]
    assert stray_weights(storages_alive(collect=False), set(reachable), {48 * 40}) == []  # alive before: not new
    del hidden


def test_a_tensor_at_the_address_of_one_freed_since_the_census_before_is_new():
    """The census before keys storages by address; one that died since may lend its address to a dense copy."""
    gone = torch.zeros(64, 64)
    before = storages_alive(collect=False)
    address = gone.untyped_storage().data_ptr()
    del gone
    copy = torch.ones(64, 64)
    before[copy.untyped_storage().data_ptr()] = before[address]  # as if the copy had taken the dead tensor's address
    assert [s.shape for s in stray_weights(before, set(), {64 * 64})] == [(64, 64)]
