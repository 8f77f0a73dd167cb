"""The benchmark's machinery, not its speed: the results schema, the correctness re-check, and a CPU run end to end.

No test here times anything. What they check is that the numbers
``lora-lab bench`` reports can be trusted: a wrong implementation, one that
caches its answer, one that modifies its inputs and one that replaces the clock
are all reported as wrong, never as fast.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from lora_lab.bench import command
from lora_lab.bench import runner as bench
from lora_lab.bench.cases import Bound, Case, Impl
from lora_lab.bench.timing import PerfCounterTimer, Settings, measure_case, validate_results
from lora_lab.cli import main
from lora_lab.lora import qlora_linear

TINY = ["--cpu", "--threads", "1", "--shapes", "128x48", "--tokens", "5", "--ranks", "4", "--repeats", "2", "--input-sets", "2"]


def _load_script(relative: str):
    """benchmarks/ is not a package: load a script from the repository by path."""
    path = Path(__file__).resolve().parents[2] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _functional(op) -> Impl:
    def setup(weight, scaling, dtype):
        return (lambda A, B: Bound(lambda x: op(x, weight, A, B, scaling), A, B)), weight.nbytes

    return Impl(op.__name__, "a test implementation", setup)


def _measure(case: Case, *impls: Impl):
    weight = bench.frozen_weight(case.N, case.K, case.dtype, seed=0, device=torch.device("cpu"))
    records, failures = measure_case(
        case, weight, [_functional(qlora_linear), *impls], PerfCounterTimer(), None, Settings(input_sets=2, repeats=2)
    )
    return {r.impl: r for r in records}, failures


def scaling_ignored(x, weight, A, B, scaling):
    return qlora_linear(x, weight, A, B, 1.0)


def half_grad_A(x, weight, A, B, scaling):
    """Right output, but dA is halved: only the backward re-check can tell."""
    return qlora_linear(x, weight, A.detach() + 0.5 * (A - A.detach()), B, scaling)


def test_cli_help_lists_the_flags_gpu_check_uses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--gpu", "--quick", "--json", "--plot", "--repeats", "--shapes"):
        assert flag in out


def test_gpu_flag_without_a_gpu_says_what_to_do(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "--gpu", "--quick", "--json", str(tmp_path / "b.json")]) == 2
    assert "without --gpu" in capsys.readouterr().err


def test_cpu_bench_runs_end_to_end_and_writes_the_documented_schema(tmp_path, capsys):
    path, chart = tmp_path / "results.json", tmp_path / "chart.png"
    started = time.monotonic()
    assert main(["bench", *TINY, "--json", str(path), "--plot", str(chart)]) == 0
    assert time.monotonic() - started < 60  # a guard against runaway repeats, not a speed test
    results = json.loads(path.read_text())
    assert validate_results(results) == []
    layer = {(r["op"], r["impl"]) for r in results["records"] if r["scope"] == "layer"}
    assert layer == {(op, impl) for op in ("forward", "backward", "step") for impl in ("reference", "bnb+peft", "dense")}
    model = {r["impl"]: r for r in results["records"] if r["scope"] == "model"}
    assert set(model) == {"reference", "bnb+peft"} and all(r["correct"] for r in model.values())
    assert all(r["correct"] and r["max_rel_err"] < 1e-5 for r in results["records"])
    assert chart.stat().st_size > 0
    storage = {(r["op"], r["impl"]): r for r in results["records"] if r["scope"] == "storage"}
    assert set(storage) == {("quantize", "reference"), ("quantize", "bitsandbytes"), ("dequantize", "reference"),
                            ("dequantize", "bitsandbytes"), ("dequantize", "fresh output")}
    out = capsys.readouterr().out
    assert "kernel timings need a GPU" in out and "vs baseline" in out
    for row in ("quantize 4096 x 4096", "dequantize 4096 x 4096", "tiny-model QLoRA step"):  # the three ratios
        assert row in out
    assert "memory-bound estimate" in out and "peft + bitsandbytes' time" in out
    summarize = _load_script("benchmarks/summarize.py")
    assert summarize.main([str(path)]) == 0
    assert "| M | K→N | r | dtype | reference | bnb+peft | dense |" in capsys.readouterr().out


def test_a_wrong_forward_is_reported_wrong():
    records, failures = _measure(Case("forward", 7, 48, 128, 4, torch.float32), _functional(scaling_ignored))
    assert not failures
    assert records["qlora_linear"].correct
    assert not records["scaling_ignored"].correct and "y:" in records["scaling_ignored"].note
    assert records["scaling_ignored"].err_vs_bound > 1


def test_a_wrong_gradient_is_caught_by_the_backward_recheck():
    forward, _ = _measure(Case("forward", 7, 48, 128, 4, torch.float32), _functional(half_grad_A))
    assert forward["half_grad_A"].correct  # the output itself is right
    for op in ("backward", "step"):
        records, _ = _measure(Case(op, 7, 48, 128, 4, torch.float32), _functional(half_grad_A))
        assert not records["half_grad_A"].correct and "dA:" in records["half_grad_A"].note
        assert records["qlora_linear"].correct


def test_a_cached_answer_is_reported_wrong():
    cache = {}

    def cached(x, weight, A, B, scaling):
        if "y" not in cache:
            cache["y"] = qlora_linear(x, weight, A, B, scaling).detach()
        return cache["y"]

    records, _ = _measure(Case("forward", 7, 48, 128, 4, torch.float32), _functional(cached))
    assert not records["cached"].correct


def test_modifying_the_inputs_is_reported_wrong():
    def mutates(x, weight, A, B, scaling):
        y = qlora_linear(x, weight, A, B, scaling)
        x.data.zero_()
        return y

    records, _ = _measure(Case("forward", 7, 48, 128, 4, torch.float32), _functional(mutates))
    assert not records["mutates"].correct and "modified its inputs (x)" in records["mutates"].note


def test_replacing_the_clock_is_reported_wrong(monkeypatch):
    def patches_clock(x, weight, A, B, scaling):
        monkeypatch.setattr(time, "perf_counter", lambda: 0.0)
        return qlora_linear(x, weight, A, B, scaling)

    records, _ = _measure(Case("forward", 7, 48, 128, 4, torch.float32), _functional(patches_clock))
    assert not records["patches_clock"].correct and "time.perf_counter" in records["patches_clock"].note
    assert records["patches_clock"].ms > 0  # our clock was bound at import: the patch did not fool it


def test_a_crashing_implementation_is_a_failure_not_a_hole():
    def crashes(x, weight, A, B, scaling):
        raise RuntimeError("kernel exploded")

    records, failures = _measure(Case("step", 7, 48, 128, 4, torch.float32), _functional(crashes))
    assert set(records) == {"qlora_linear"}
    assert failures and "kernel exploded" in failures[0]["error"]


def test_the_cli_exits_1_and_says_wrong(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(bench.IMPLS, "scaling_ignored", _functional(scaling_ignored))
    monkeypatch.setattr(command, "IMPL_NAMES", (*command.IMPL_NAMES, "scaling_ignored"))
    argv = ["bench", *TINY, "--no-model", "--no-nf4", "--ops", "forward", "--impls", "reference,scaling_ignored"]
    assert main([*argv, "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "WRONG: scaling_ignored" in out
    records = json.loads((tmp_path / "r.json").read_text())["records"]
    assert [r["correct"] for r in records] == [True, False]


def test_cost_model_counts_the_step_as_forward_plus_backward():
    forward, backward, step = (Case(op, 16, 1024, 4096, 16, torch.bfloat16) for op in ("forward", "backward", "step"))
    assert forward.flops() == 2 * 16 * 1024 * 4096 + 2 * 16 * 16 * (4096 + 1024)
    assert step.flops() == forward.flops() + backward.flops()
    nf4_bytes = 1024 * 4096 // 2
    assert forward.min_bytes(nf4_bytes) == nf4_bytes + 2 * (16 * 4096 + 16 * 1024 + 16 * (4096 + 1024))


def test_schema_validation_names_what_is_missing():
    problems = validate_results({"device": "x", "date": "2026-01-01", "torch": "2", "triton": "3", "records": [{"op": "fwd"}]})
    assert any("lacks 'ms'" in p for p in problems) and any("op of a layer record must be one of" in p for p in problems)


class _FakeEvent:
    """Stands in for torch.cuda.Event on the CPU: records the host clock."""

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing, "elapsed_time needs events created with enable_timing=True"
        self.at = None

    def record(self) -> None:
        self.at = time.perf_counter()

    def elapsed_time(self, end: _FakeEvent) -> float:
        return (end.at - self.at) * 1e3


def test_the_cuda_timer_flushes_synchronizes_and_times_only_the_call(monkeypatch):
    """The GPU timer's logic on the CPU, with CUDA's event and synchronize swapped for host stand-ins."""
    from lora_lab.bench import timers as benchmarking

    calls = []
    monkeypatch.setattr(benchmarking, "_CUDA_EVENT", _FakeEvent)
    monkeypatch.setattr(benchmarking, "_EVENT_RECORD", lambda event: (calls.append("record"), event.record()))
    monkeypatch.setattr(benchmarking, "_EVENT_ELAPSED", _FakeEvent.elapsed_time)
    monkeypatch.setattr(benchmarking, "_CUDA_SYNC", lambda device: calls.append("sync"))
    timer = benchmarking.CudaEventTimer("cpu", flush_bytes=4096)
    timer._flush.fill_(7)
    ms = timer.time_call(lambda: (calls.append("run"), time.sleep(0.02)))
    assert calls == ["sync", "record", "run", "record", "sync"]  # flushed and idle before the start event
    assert not timer._flush.any()
    assert 15 < ms < 1000

    class CpuMemory(benchmarking.CudaEventTimer):  # torch.cuda's memory statistics need a device
        peak_memory_mb = PerfCounterTimer.peak_memory_mb

    weight = bench.frozen_weight(48, 128, torch.float32, seed=0, device=torch.device("cpu"))
    records, failures = measure_case(
        Case("step", 7, 48, 128, 4, torch.float32), weight, [_functional(qlora_linear), _functional(half_grad_A)],
        CpuMemory("cpu", flush_bytes=4096), None, Settings(input_sets=2, repeats=3),
    )
    assert not failures and [r.correct for r in records] == [True, False]


def test_a_cpu_run_prints_no_profiler_lines_and_writes_under_runs(tmp_path):
    """A fresh process, as a user runs it: kineto read its log level at the first profile (two lines a run)."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "lora_lab.cli", "bench", *TINY, "--ops", "forward", "--impls", "reference", "--no-model",
            "--no-nf4"]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "profiler_start" not in done.stderr and "USDT" not in done.stderr
    (written,) = (tmp_path / "runs" / "bench").glob("*.json")  # not benchmarks/results/ in whatever folder it ran from
    assert written.name.endswith("-partial.json")  # a selection: the day's full results file stays as it was
    assert f"results: {written.relative_to(tmp_path)}" in done.stdout
