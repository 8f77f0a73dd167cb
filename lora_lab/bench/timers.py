"""The clocks ``lora-lab bench`` times with: bound when this module is imported, so an implementation cannot swap them.

``PerfCounterTimer`` times CPU calls with the host's wall clock; ``CudaEventTimer``
times one GPU call between CUDA events after flushing L2, and, for forwards of at
most ``GRAPHED_MAX_M`` rows (decoding sizes), one replay of a CUDA graph of the
call, so that the kernels are measured and not Python's launch overhead.
``timer_tampering`` names any clock function replaced since. How the timers are
used (fresh inputs, medians, the re-check) is ``lora_lab.bench.timing``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from lora_lab.bench.cases import Case

# Bound now, before any implementation is imported: replacing these later does not change our clock.
_PERF_COUNTER = time.perf_counter
_CUDA_EVENT = torch.cuda.Event
_EVENT_RECORD = torch.cuda.Event.record
_EVENT_ELAPSED = torch.cuda.Event.elapsed_time
_CUDA_SYNC = torch.cuda.synchronize
_TIMER_FUNCTIONS = {
    "time.perf_counter": (lambda: time.perf_counter, _PERF_COUNTER),
    "torch.cuda.Event": (lambda: torch.cuda.Event, _CUDA_EVENT),
    "torch.cuda.Event.record": (lambda: torch.cuda.Event.record, _EVENT_RECORD),
    "torch.cuda.Event.elapsed_time": (lambda: torch.cuda.Event.elapsed_time, _EVENT_ELAPSED),
    "torch.cuda.synchronize": (lambda: torch.cuda.synchronize, _CUDA_SYNC),
}

L2_FLUSH_BYTES = 256 * 2**20  # larger than any GPU's L2 (H100: 50 MB, H200: 60 MB)
GRAPHED_MAX_M = 16  # forwards of at most this many rows are timed as a CUDA graph replay (see the module docstring)


# ----------------------------------------------------------------------------- timers


class PerfCounterTimer:
    """Host wall-clock timing for CPU tensors; nothing to flush or synchronize."""

    name = "time.perf_counter, one call per trial, caches not flushed"

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def time_call(self, run: Callable[[], object]) -> float:
        start = _PERF_COUNTER()
        run()
        return (_PERF_COUNTER() - start) * 1e3

    def peak_memory_mb(self, run: Callable[[], object]) -> float:
        """Peak of CPU tensor allocations minus frees during ``run``, from torch.profiler's allocation events."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        events = sorted(
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        )
        current = peak = 0
        for _, nbytes in events:
            current += nbytes
            peak = max(peak, current)
        return peak / 1e6


class CudaEventTimer:
    """CUDA events around one call, after an L2 flush and a synchronize; synchronized again after."""

    name = (f"CUDA events, L2 flushed and device synchronized before each call; forwards of M <= {GRAPHED_MAX_M} "
            "replay a CUDA graph of the call (kernels only, no Python or launch overhead)")

    def __init__(self, device: torch.device | str = "cuda", flush_bytes: int = L2_FLUSH_BYTES) -> None:
        self.device = torch.device(device)
        self._flush = torch.empty(flush_bytes // 4, dtype=torch.int32, device=self.device)

    def time_call(self, run: Callable[[], object]) -> float:
        start, end = _CUDA_EVENT(enable_timing=True), _CUDA_EVENT(enable_timing=True)
        self._flush.zero_()
        _CUDA_SYNC(self.device)
        _EVENT_RECORD(start)
        run()
        _EVENT_RECORD(end)
        _CUDA_SYNC(self.device)
        return _EVENT_ELAPSED(start, end)

    def time_graph(self, run: Callable[[], object]) -> float | None:
        """``run`` captured in a CUDA graph (after one warm-up call on a side stream), then one replay timed as
        ``time_call`` times a call; None, after a warm-up call, when ``run`` cannot be captured."""
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        try:
            with torch.cuda.graph(graph):
                run()
        except Exception:  # noqa: BLE001 - a call that cannot be captured is timed eagerly by the caller
            _CUDA_SYNC(self.device)
            return None
        return self.time_call(graph.replay)

    def peak_memory_mb(self, run: Callable[[], object]) -> float:
        """``torch.cuda.max_memory_allocated`` during ``run`` minus what was allocated just before it."""
        _CUDA_SYNC(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        run()
        _CUDA_SYNC(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - before) / 1e6


Timer = PerfCounterTimer | CudaEventTimer


def graphed(case: Case, timer: Timer) -> bool:
    """Whether ``case``'s trials are timed as CUDA graph replays: forwards of at most GRAPHED_MAX_M rows on a GPU."""
    return timer.device.type == "cuda" and case.op == "forward" and case.M <= GRAPHED_MAX_M


def timer_tampering() -> list[str]:
    """Names of clock functions that no longer are what they were when this module was imported."""
    return [name for name, (current, original) in _TIMER_FUNCTIONS.items() if current() is not original]


def best_ms(timer: Timer, run: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` calls after a warm-up: what the device can do, for the roofline (not for results)."""
    run()
    return min(timer.time_call(run) for _ in range(repeats))
