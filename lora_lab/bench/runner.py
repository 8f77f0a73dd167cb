"""One run of ``lora-lab bench`` (see ``command`` for what it measures): the cases, the measuring and the results file.

Kept apart from ``command`` so that the command line itself imports no torch.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import logging
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lora_lab.bench.cases import DTYPES, Case
from lora_lab.bench.impls import IMPLS, fast_dequantizer, unavailable
from lora_lab.bench.model_step import large_vocab_records, model_step_records
from lora_lab.bench.names import CPU_IMPLS, GPU_IMPLS, OPS
from lora_lab.bench.nf4_storage import storage_records
from lora_lab.bench.report import (
    baseline_lines,
    default_json_path,
    device_name,
    format_table,
    plot,
    summary_lines,
    write_json,
)
from lora_lab.bench.timing import CudaEventTimer, PerfCounterTimer, Settings, measure_case, measure_roofline
from lora_lab.nf4 import NF4Tensor, quantize_nf4

LLAMA_3_1_8B_SHAPES = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))  # (K, N): q/o, k/v, gate/up, down
GPU_TOKENS, GPU_RANKS, GPU_DTYPES = (1, 16, 64, 512, 4096, 16384), (16, 64), ("bf16", "fp16")
QUICK = dict(shapes=((4096, 4096), (4096, 14336)), tokens=(16, 4096), ranks=(16,), dtypes=("bf16",), time_budget=210.0)
CPU_SHAPES, CPU_TOKENS, CPU_RANKS, CPU_DTYPES = ((1024, 1024), (2048, 512)), (16, 256), (16,), ("fp32",)
INTERPRETED_MINUTES_PER_CASE = 2  # the fused kernels under Triton's interpreter, 2 cores: the 12 default cases took 25 min
SELECTING = ("shapes", "tokens", "ranks", "dtypes", "ops", "impls", "time_budget", "no_model", "no_nf4")


def layer_cases(shapes, tokens, ranks, dtypes, ops) -> list[Case]:
    """Every combination, ordered so that consecutive cases share a weight (quantized once) and a float64 check."""
    return [
        Case(op, M, N, K, r, DTYPES[dtype])
        for (K, N), dtype, r, M, op in itertools.product(shapes, dtypes, ranks, tokens, ops)
    ]


def frozen_weight(N: int, K: int, dtype: torch.dtype, seed: int, device: torch.device) -> NF4Tensor:
    """A seeded N x K weight ~ N(0, 0.02^2) in NF4 as QLoRA stores it: blocksize 64, double quantization."""
    g = torch.Generator(device=device).manual_seed(seed)
    weight = (torch.randn(N, K, generator=g, device=device) * 0.02).to(dtype)
    return quantize_nf4(weight, blocksize=64, double_quant=True)


def run_layers(cases, impls, timer, roofline, settings, deadline, progress, after_case):
    """Measure every case that starts before ``deadline`` (time.monotonic); returns records, failures, skipped cases."""
    records, failures, skipped = [], [], []
    weights: dict = {}
    expected_cache: dict = {}
    for case in cases:
        progress.set_description(str(case))
        if deadline is not None and time.monotonic() > deadline:
            skipped.append(str(case))
            progress.update(len(impls))
            continue
        key = (case.N, case.K, case.dtype)
        if key not in weights:
            weights.clear()
            weights[key] = frozen_weight(case.N, case.K, case.dtype, settings.seed, timer.device)
        new_records, new_failures = measure_case(case, weights[key], impls, timer, roofline, settings, expected_cache)
        records += new_records
        failures += new_failures
        progress.update(len(impls))
        after_case(records, failures, skipped)
    return records, failures, skipped


def results_path(args: argparse.Namespace, device: str, date: str, quick: bool) -> Path:
    """--json, else runs/bench/<date>-<device>.json for the default run: a selection (a subset of shapes, impls,
    ops, ..., or --quick) gets its own -partial / -quick file, so that it never replaces the day's full results."""
    if args.json:
        return Path(args.json)
    tag = "quick" if quick else "partial" if any(getattr(args, name) not in (None, False) for name in SELECTING) else ""
    return default_json_path(device, date, tag)


def interpreted_estimate(impls, cases: int, on_gpu: bool) -> str:
    """What '--impls fused' costs on a CPU, said before it starts ("" on a GPU or without fused)."""
    if on_gpu or "fused" not in impls:
        return ""
    return (f"the fused Triton kernels on a CPU run under Triton's interpreter: about "
            f"{INTERPRETED_MINUTES_PER_CASE * cases} minutes for these {cases} case(s) "
            f"(~{INTERPRETED_MINUTES_PER_CASE} min each on 2 cores), and the times measure the interpreter, not the kernels")


def measure_all(cases, impls, timer, roofline, settings, deadline, progress, save, with_nf4, with_model, vocab_step):
    """The layer cases, then (CPU) NF4 storage, the tiny model's step and the 128k-vocabulary step: records, failures,
    skipped cases. A whole-model comparison that fails is a failure of the run, reported with the rest."""
    records, failures, skipped = run_layers(cases, impls, timer, roofline, settings, deadline, progress, save)
    wholes = [("NF4 quantize and dequantize, 4096 x 4096", "reference, bitsandbytes", 1, with_nf4,
               lambda: storage_records(timer, settings, roofline)),
              ("training step of the tiny model", "reference, bnb+peft", 2, with_model,
               lambda: model_step_records(timer, settings)),
              ("training step with a 128,256-token vocabulary", "full logits, labelled logits", 0, vocab_step,
               lambda: large_vocab_records(timer, settings))]
    for what, who, runs, wanted, measure in wholes:
        if not wanted:
            continue
        progress.set_description(what)
        try:
            records += measure()
        except Exception as exc:  # noqa: BLE001 - report it with the rest
            failures.append({"case": what, "impl": who, "error": f"{type(exc).__name__}: {exc}"})
        progress.update(runs)
        save(records, failures, skipped)
    return records, failures, skipped


def run(args: argparse.Namespace) -> int:
    """Measure, print the table and the comparisons, write the results file; exit 1 if anything was wrong."""
    # The peak-memory measure runs torch.profiler once per case; at its default log level kineto prints two
    # lines per run (about 70 in a CPU benchmark), through the progress bar. Level 6 is above all of kineto's.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # its optional-kernels advice
    if args.gpu and not torch.cuda.is_available():
        print("lora-lab bench: --gpu needs a CUDA device and torch.cuda.is_available() is False here; "
              "run 'lora-lab bench' without --gpu for the CPU benchmark", file=sys.stderr)
        return 2
    on_gpu = args.gpu or (not args.cpu and torch.cuda.is_available())
    device = torch.device("cuda" if on_gpu else "cpu")
    quick = QUICK if args.quick and on_gpu else {}
    shapes = args.shapes or quick.get("shapes") or (LLAMA_3_1_8B_SHAPES if on_gpu else CPU_SHAPES)
    tokens = args.tokens or quick.get("tokens") or (GPU_TOKENS if on_gpu else CPU_TOKENS)
    ranks = args.ranks or quick.get("ranks") or (GPU_RANKS if on_gpu else CPU_RANKS)
    dtypes = args.dtypes or quick.get("dtypes") or (GPU_DTYPES if on_gpu else CPU_DTYPES)
    budget = args.time_budget if args.time_budget is not None else quick.get("time_budget")
    timer = CudaEventTimer(device) if on_gpu else PerfCounterTimer(device)
    if not on_gpu and args.threads > 0:
        torch.set_num_threads(args.threads)
    budget_ms = (50 if quick else 100) if on_gpu else 300  # timed work per implementation and case
    settings = Settings(input_sets=args.input_sets, repeats=args.repeats, budget_ms=budget_ms, seed=args.seed)

    notes = [f"timing: {timer.name}; median of the trials; implementations interleaved trial by trial"]
    notes.append(
        "peak_mem_mb: torch.cuda.max_memory_allocated during one call minus what was allocated before it"
        if on_gpu else
        "peak_mem_mb: peak of CPU tensor allocations minus frees during one call (torch.profiler allocation events); "
        "inputs, the weight and, for backward, the saved forward state are allocated before and not counted"
    )
    cases = layer_cases(shapes, tokens, ranks, dtypes, args.ops or OPS)
    names = args.impls or (GPU_IMPLS if on_gpu else CPU_IMPLS)
    estimate = interpreted_estimate(names, len(cases), on_gpu)
    if estimate and not args.interpreted:
        print(f"lora-lab bench: {estimate}. Add --interpreted to run it anyway (it checks the kernels' results without "
              "a GPU), or run 'lora-lab bench --gpu' on a CUDA machine", file=sys.stderr)
        return 2
    if estimate:
        print(f"lora-lab bench: warning: {estimate}; running it, as --interpreted asks", file=sys.stderr)
    impls, setup_failures = [], []
    for name in names:
        reason = unavailable(name, device)
        if reason and name == "fused" and on_gpu:  # the kernels are what a GPU run is for: not importing them is a failure
            setup_failures.append({"case": "import", "impl": name, "error": reason})
        elif reason:
            notes.append(f"{name} skipped: {reason}")
        else:
            impls.append(IMPLS[name])
    if not on_gpu:
        notes.append("kernel timings need a GPU: on the CPU the fused Triton kernels run under Triton's interpreter, "
                     "which measures the interpreter, not the kernels (run 'lora-lab bench --gpu' on a CUDA machine)")
    if any(i.name == "dequant+cublas" for i in impls):
        dequantizer, _ = fast_dequantizer(frozen_weight(64, 64, torch.float32, 0, device))
        notes.append(f"dequant+cublas dequantizes with {dequantizer}")

    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    name = device_name(device)
    path = results_path(args, name, date, bool(quick))
    incomplete = path.with_name(path.stem + ".incomplete.json")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    started = time.monotonic()
    sizes = dict(copy_mb=1024, matmul_n=8192) if on_gpu else dict(copy_mb=64, matmul_n=512)
    roofline = measure_roofline(timer, [DTYPES[d] for d in dtypes], **sizes)
    results = {
        "device": name, "date": date, "torch": torch.__version__, "triton": triton_version,
        "mode": "gpu" if on_gpu else "cpu", "quick": bool(quick), "threads": torch.get_num_threads(),
        "roofline": {"copy_gbps": roofline.copy_gbps, "matmul_tflops": roofline.matmul_tflops}, "notes": notes,
        "failures": [], "skipped_cases": [], "records": [],
    }

    def save(records, failures, skipped, to: Path = incomplete) -> None:
        """After every case into the .incomplete file, so that a run cut short leaves its results but not over the
        results file; at the end into the results file."""
        results.update(records=[r.to_json() for r in records], failures=failures, skipped_cases=skipped)
        write_json(results, to)

    with_model = not on_gpu and not args.no_model and not unavailable("bnb+peft", device)
    with_nf4 = not on_gpu and not args.no_nf4 and not unavailable("bnb+peft", device)
    progress = tqdm(total=len(cases) * len(impls) + 2 * with_model + with_nf4, file=sys.stderr, unit="run", leave=False)
    deadline = None if budget is None else started + budget
    try:
        records, failures, skipped = measure_all(cases, impls, timer, roofline, settings, deadline, progress, save,
                                                 with_nf4, with_model, args.vocab_step and not on_gpu)
    except KeyboardInterrupt:
        progress.close()
        kept = f"the results so far are in {incomplete}" if incomplete.exists() else "no case had finished"
        print(f"lora-lab bench: interrupted (Ctrl-C); {kept}; {path} was not written", file=sys.stderr)
        return 130
    progress.close()
    failures = setup_failures + failures
    if skipped:
        notes.append(f"{len(skipped)} case(s) skipped: the time budget of {budget:g} s ran out")
    save(records, failures, skipped, to=path)
    incomplete.unlink(missing_ok=True)

    threads = "" if on_gpu else f", {torch.get_num_threads()} CPU thread(s)"
    elapsed = time.monotonic() - started
    print(f"lora-lab bench on {name}{threads}: torch {torch.__version__}, triton {triton_version}, {elapsed:.0f} s")
    print(f"roofline: copy {roofline.copy_gbps:.0f} GB/s, matmul "
          + ", ".join(f"{d} {t:.3g} TFLOP/s" for d, t in roofline.matmul_tflops.items()))
    print(format_table(records, results["roofline"]))
    for line in summary_lines(records):
        print(line)
    for line in baseline_lines(records):
        print(line)
    for note in notes[2:]:
        print(f"note: {note}")
    for failure in failures:
        print(f"FAILED: {failure['impl']} on {failure['case']}: {failure['error']}")
    wrong = [r for r in records if not r.correct]
    for record in wrong:
        where = f"{record.op} M={record.M} {record.K}->{record.N} r={record.r} {record.dtype}"
        print(f"WRONG: {record.impl} on {where}: {record.note}")
    print(f"results: {path}")
    if args.plot:
        plot(records, args.plot)
        print(f"chart: {args.plot}")
    return 1 if wrong or failures else 0
