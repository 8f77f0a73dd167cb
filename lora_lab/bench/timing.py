"""How ``lora-lab bench`` measures: timing you can trust, a correctness re-check, and a roofline.

A benchmark is only worth reading if a wrong or gamed implementation cannot
look fast. So, following KernelBench and gpu-mode's reference-kernels:

- **Fresh inputs per trial.** Each case draws a few seeded input sets; every
  timed trial gets its own clones of one of them (rotating), so no trial sees
  tensors an earlier trial could have modified or indexed a cache by.
- **Cold caches, one call at a time.** On a GPU each trial zeroes a 256 MB
  buffer (evicting L2), synchronizes, then times one call with CUDA events and
  synchronizes again. Host-side overhead (Python, kernel launches) is
  therefore included, as it is when a layer runs on its own. On a CPU the
  timer is ``time.perf_counter`` and caches are not flushed.
- **CUDA graphs for a few rows.** A forward of M <= 16 rows (decoding) is a
  few microseconds of kernels, less than the Python and launch overhead around
  them, which a model that decodes removes with CUDA graphs. So on a GPU each
  such trial captures its call in a ``torch.cuda.CUDAGraph`` (after a warm-up
  call on a side stream, untimed) and times one replay: the kernels, not
  Python. An implementation that cannot be captured (it syncs with the host,
  say) is timed eagerly instead, and its record's note says so.
- **Median** of the trials, after warm-up calls on every input set (which is
  also when Triton compiles and autotunes). Implementations are timed
  round-robin, trial by trial, so a machine that slows down (a shared CPU,
  clocks) slows all of them alike.
- **Correctness re-checked after timing**, on a fresh input set whose output
  memory was first filled with NaN, against float64 computed from the
  dequantized weight, within ``conformance.compare.product_bound``. The same
  call also checks that the inputs were left unchanged and that nobody replaced
  the timer (the clock functions are bound when this module is imported). A
  wrong result is reported as wrong, never as fast.

The roofline: each case's FLOPs and the fewest bytes it must move, against the
device's measured copy bandwidth and matmul rate, give a floor time; "% of
floor" says how close an implementation comes to it.

What a case is lives in ``bench_cases``, the float64 re-check in
``bench_correctness``; this module is the timing loop that ties them together.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from lora_lab.bench.cases import Case, Impl, Inputs, draw_inputs, dtype_name
from lora_lab.bench.correctness import float64_expected, judge, poison_allocator
from lora_lab.bench.names import MODEL_OPS, OPS, STORAGE_OPS
from lora_lab.bench.timers import (  # noqa: F401 - re-exported: the timers are part of the timing loop's interface
    GRAPHED_MAX_M,
    CudaEventTimer,
    PerfCounterTimer,
    Timer,
    best_ms,
    graphed,
    timer_tampering,
)
from lora_lab.nf4 import NF4Tensor

SCALING = 2.0  # alpha / r with the common alpha = 2r


# ----------------------------------------------------------------------------- roofline


@dataclass(frozen=True)
class Roofline:
    """What the device can do at best, measured once per run."""

    copy_gbps: float  # device memory copy: (bytes read + bytes written) / time
    matmul_tflops: dict[str, float]  # dense square matmul rate per dtype name

    def floor_ms(self, case: Case, weight_bytes: int) -> float:
        compute = case.flops() / (self.matmul_tflops[dtype_name(case.dtype)] * 1e12)
        memory = case.min_bytes(weight_bytes) / (self.copy_gbps * 1e9)
        return max(compute, memory) * 1e3


def measure_roofline(timer: Timer, dtypes: Sequence[torch.dtype], copy_mb: int = 1024, matmul_n: int = 8192) -> Roofline:
    """Copy bandwidth from a ``copy_mb`` tensor copy; matmul rate from an n x n x n matmul per dtype; best of 5 each."""
    device = timer.device
    rates = {}
    for dtype in dtypes:
        a = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
        b = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
        matmul_ms = best_ms(timer, lambda a=a, b=b: a @ b, repeats=5)
        rates[dtype_name(dtype)] = 2 * matmul_n**3 / (matmul_ms * 1e-3) / 1e12
    return Roofline(copy_gbps=2 * copy_mb * 2**20 / (_copy_ms(timer, copy_mb) * 1e-3) / 1e9, matmul_tflops=rates)


def _copy_ms(timer: Timer, megabytes: int) -> float:
    source = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=timer.device)
    target = torch.empty_like(source)
    return best_ms(timer, lambda: target.copy_(source), repeats=5)


# ----------------------------------------------------------------------------- one case, every implementation


@dataclass
class Settings:
    input_sets: int = 3  # seeded input sets the timed trials rotate among
    repeats: int | None = None  # fixed number of timed trials per implementation; None: fit budget_ms
    budget_ms: float = 100.0  # adaptive: aim for this much timed work per implementation
    min_repeats: int = 5
    max_repeats: int = 100
    seed: int = 0


@dataclass
class Record:
    """One implementation on one case: the JSON record (``RECORD_KEYS``, then the extras)."""

    op: str
    M: int
    N: int
    K: int
    r: int
    dtype: str
    impl: str
    ms: float
    tflops: float
    gbps: float
    peak_mem_mb: float
    max_rel_err: float | None
    scope: str = "layer"  # "layer": one QLoRA linear; "model": a training step of the tiny model; "storage": NF4
    correct: bool = True
    err_vs_bound: float | None = None  # worst error over its tolerance; <= 1 is correct
    floor_ms: float | None = None  # roofline floor of this case
    pct_of_floor: float | None = None  # 100 * floor_ms / ms
    resident_mb: float | None = None  # weight storage the implementation keeps between calls
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)


OPS_OF_SCOPE = {"layer": OPS, "model": MODEL_OPS, "storage": STORAGE_OPS}
RECORD_KEYS = ("op", "M", "N", "K", "r", "dtype", "impl", "ms", "tflops", "gbps", "peak_mem_mb", "max_rel_err")


class _Prepared:
    """An implementation bound to fresh clones of one input set, ready for one timed call."""

    def __init__(self, case: Case, bind, inputs: Inputs, before_outputs: Callable[[], None] | None = None) -> None:
        self.case = case
        self.x = inputs.x.clone().requires_grad_()  # as inside a model: the forward keeps what dX will need
        self.grad_y = inputs.grad_y.clone()
        self.bound = bind(inputs.lora_A.clone().requires_grad_(), inputs.lora_B.clone().requires_grad_())
        if before_outputs is not None:  # after the input clones, so that they cannot take the poisoned blocks
            before_outputs()
        self.y = self.bound.forward(self.x) if case.op == "backward" else None  # untimed: only backward is timed

    def run(self) -> None:
        if self.case.op == "forward":
            self.y = self.bound.forward(self.x)
        elif self.case.op == "backward":
            self.y.backward(self.grad_y)
        else:
            self.y = self.bound.forward(self.x)
            self.y.backward(self.grad_y)

    def outputs(self) -> dict[str, torch.Tensor | None]:
        got = {"y": None if self.y is None else self.y.detach()}
        if self.case.op != "forward":
            got.update(dX=self.x.grad, dA=self.bound.lora_A.grad, dB=self.bound.lora_B.grad)
        return got


def _inputs_unchanged(before: Inputs, prepared: _Prepared, name: str) -> str:
    pairs = [("x", before.x, prepared.x), ("dY", before.grad_y, prepared.grad_y)]
    pairs += [("lora_A", before.lora_A, prepared.bound.lora_A), ("lora_B", before.lora_B, prepared.bound.lora_B)]
    changed = [label for label, a, b in pairs if not torch.equal(a, b.detach())]
    return f"{name} modified its inputs ({', '.join(changed)}); inputs must be left unchanged" if changed else ""


def measure_case(
    case: Case,
    weight: NF4Tensor,
    impls: Sequence[Impl],
    timer: Timer,
    roofline: Roofline | None,
    settings: Settings,
    expected_cache: dict | None = None,
) -> tuple[list[Record], list[dict]]:
    """Time every implementation on ``case`` round-robin, then re-check each one's results; returns records and failures."""
    device = timer.device
    input_sets = [draw_inputs(case, settings.seed + i, device) for i in range(settings.input_sets)]
    failures: list[dict] = []
    ready: dict[str, tuple[Callable, int]] = {}
    estimates: dict[str, float] = {}
    for impl in impls:  # set up and warm up (compiles and autotunes) on every input set
        try:
            bind, resident = impl.setup(weight, SCALING, case.dtype)
            for inputs in input_sets:
                _Prepared(case, bind, inputs).run()
            estimates[impl.name] = timer.time_call(_Prepared(case, bind, input_sets[0]).run)
            ready[impl.name] = (bind, resident)
        except Exception as exc:  # noqa: BLE001 - one broken implementation must not hide the others
            failures.append({"case": str(case), "impl": impl.name, "error": f"{type(exc).__name__}: {exc}"})
            _release(device)
    if not ready:
        return [], failures
    repeats = settings.repeats or int(
        min(settings.max_repeats, max(settings.min_repeats, settings.budget_ms * len(ready) / max(sum(estimates.values()), 1e-3)))
    )
    times: dict[str, list[float]] = {name: [] for name in ready}
    eager: set[str] = set()  # implementations a graphed case had to time eagerly: their capture failed
    for trial in range(repeats):
        inputs = input_sets[trial % len(input_sets)]
        for name, (bind, _) in list(ready.items()):
            try:
                run = _Prepared(case, bind, inputs).run
                ms = timer.time_graph(run) if graphed(case, timer) else None
                if ms is None and graphed(case, timer):
                    eager.add(name)
                times[name].append(timer.time_call(run) if ms is None else ms)
            except Exception as exc:  # noqa: BLE001
                failures.append({"case": str(case), "impl": name, "error": f"{type(exc).__name__}: {exc}"})
                del ready[name]
                _release(device)
    del input_sets
    check_inputs = draw_inputs(case, settings.seed + 10_000, device)
    cache = {} if expected_cache is None else expected_cache  # one entry: backward and step share it
    key = (case.M, case.N, case.K, case.r, case.dtype, id(weight), settings.seed)
    expected = cache.get(key)
    if expected is None or (case.op != "forward" and "dX" not in expected):
        expected = float64_expected(case, weight, check_inputs, SCALING)
        cache.clear()
        cache[key] = expected
    records = []
    for name, (bind, resident) in ready.items():
        try:
            records.append(_finish(case, name, bind, resident, times[name], weight, timer, roofline, check_inputs, expected))
            if name in eager:
                records[-1].note = "; ".join(filter(None, [records[-1].note, "timed eagerly: no CUDA graph captured"]))
        except Exception as exc:  # noqa: BLE001
            failures.append({"case": str(case), "impl": name, "error": f"{type(exc).__name__}: {exc}"})
            _release(device)
    return records, failures


def _finish(case, name, bind, resident, times, weight, timer, roofline, check_inputs, expected) -> Record:
    """Peak memory on one more call, then the correctness re-check on fresh inputs, into a Record."""
    peak = timer.peak_memory_mb(_Prepared(case, bind, check_inputs).run)
    poison = lambda: poison_allocator([(want.shape, case.dtype) for want, _ in expected.values()], timer.device)  # noqa: E731
    prepared = _Prepared(case, bind, check_inputs, before_outputs=poison)
    prepared.run()
    verdict = judge(prepared.outputs(), expected)
    problems = [verdict.message] if verdict.message else []
    mutated = _inputs_unchanged(check_inputs, prepared, name)
    tampered = timer_tampering()
    problems += [mutated] if mutated else []
    problems += [f"the timer was replaced ({', '.join(tampered)})"] if tampered else []
    ms = statistics.median(times)
    weight_bytes = weight.nbytes
    floor = roofline.floor_ms(case, weight_bytes) if roofline else None
    return Record(
        op=case.op, M=case.M, N=case.N, K=case.K, r=case.r, dtype=dtype_name(case.dtype), impl=name,
        ms=ms, tflops=case.flops() / (ms * 1e-3) / 1e12, gbps=case.min_bytes(weight_bytes) / (ms * 1e-3) / 1e9,
        peak_mem_mb=peak, max_rel_err=verdict.max_rel_err, correct=not problems, err_vs_bound=verdict.err_vs_bound,
        floor_ms=floor, pct_of_floor=None if floor is None else 100 * floor / ms, resident_mb=resident / 1e6,
        note="; ".join(problems),
    )


def _release(device: torch.device) -> None:
    """After a failure (often out-of-memory), give cached blocks back so the next implementation can run."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- results file


def validate_results(results: dict) -> list[str]:
    """Problems with a results dict against the documented schema; empty when it conforms."""
    problems = []
    for key, kind in (("device", str), ("date", str), ("torch", str), ("triton", str), ("records", list)):
        if not isinstance(results.get(key), kind):
            problems.append(f"top-level {key!r} must be a {kind.__name__}")
    for i, record in enumerate(results.get("records") or []):
        for key in RECORD_KEYS:
            if key not in record:
                problems.append(f"record {i} lacks {key!r}")
        scope = record.get("scope", "layer")
        ops = OPS_OF_SCOPE.get(scope)
        if ops is None:
            problems.append(f"record {i}: scope must be one of {tuple(OPS_OF_SCOPE)}, got {scope!r}")
        elif record.get("op") not in ops:
            problems.append(f"record {i}: op of a {scope} record must be one of {ops}, got {record.get('op')!r}")
        for key in ("M", "N", "K", "r"):
            if not isinstance(record.get(key), int):
                problems.append(f"record {i}: {key} must be an int")
        for key in ("ms", "tflops", "gbps", "peak_mem_mb"):
            if not isinstance(record.get(key), float):
                problems.append(f"record {i}: {key} must be a float")
        if not (record.get("max_rel_err") is None or isinstance(record.get("max_rel_err"), float)):
            problems.append(f"record {i}: max_rel_err must be a float (or null when an output was not finite)")
    return problems
