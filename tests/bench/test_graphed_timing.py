"""Which trials the benchmark times as CUDA graph replays, and what it does when a call cannot be captured.

Graphs need a GPU; what is checked here, on the CPU, is the decision (forwards of
at most GRAPHED_MAX_M rows, on a CUDA device only) and ``measure_case``'s use of
it, with a stand-in timer: a captured call's time is the replay's, and a call
that cannot be captured is timed eagerly and its record says so.
"""

from __future__ import annotations

import torch

from lora_lab.bench import runner as bench
from lora_lab.bench import timing
from lora_lab.bench.cases import Bound, Case, Impl
from lora_lab.bench.timing import GRAPHED_MAX_M, PerfCounterTimer, Settings, graphed, measure_case
from lora_lab.lora import qlora_linear


class OnCuda:
    """Only what ``graphed`` reads of a timer: its device."""

    device = torch.device("cuda")


def test_only_small_forwards_on_a_gpu_are_graphed():
    small, large = Case("forward", GRAPHED_MAX_M, 48, 128, 4, torch.float32), Case("forward", 17, 48, 128, 4, torch.float32)
    assert graphed(small, OnCuda()) and graphed(Case("forward", 1, 48, 128, 4, torch.bfloat16), OnCuda())
    assert not graphed(large, OnCuda())
    assert not graphed(Case("step", 1, 48, 128, 4, torch.float32), OnCuda())  # backward accumulates into .grad
    assert not graphed(small, PerfCounterTimer())


class GraphingTimer(PerfCounterTimer):
    """A CPU timer standing in for CudaEventTimer: a 'replay' takes REPLAY_MS, or capture fails (None)."""

    REPLAY_MS = 1234.5

    def __init__(self, captures: bool) -> None:
        super().__init__("cpu")
        self.captures, self.captured = captures, 0

    def time_graph(self, run) -> float | None:
        run()  # the warm-up call
        self.captured += self.captures
        return self.REPLAY_MS if self.captures else None


def _measure(monkeypatch, timer):
    monkeypatch.setattr(timing, "graphed", lambda case, t: t is timer and case.op == "forward")
    case = Case("forward", 3, 48, 128, 4, torch.float32)
    weight = bench.frozen_weight(case.N, case.K, case.dtype, seed=0, device=torch.device("cpu"))
    impl = Impl("reference", "qlora_linear", lambda w, s, d: (
        (lambda A, B: Bound(lambda x: qlora_linear(x, w, A, B, s), A, B)), w.nbytes))
    records, failures = measure_case(case, weight, [impl], timer, None, Settings(input_sets=2, repeats=3))
    assert not failures and len(records) == 1 and records[0].correct, (failures, records)
    return records[0]


def test_a_captured_call_is_timed_by_its_replay(monkeypatch):
    timer = GraphingTimer(captures=True)
    record = _measure(monkeypatch, timer)
    assert timer.captured == 3 and record.ms == GraphingTimer.REPLAY_MS
    assert "eagerly" not in record.note


def test_a_call_that_cannot_be_captured_is_timed_eagerly_and_says_so(monkeypatch):
    record = _measure(monkeypatch, GraphingTimer(captures=False))
    assert record.ms != GraphingTimer.REPLAY_MS and "timed eagerly: no CUDA graph captured" in record.note
