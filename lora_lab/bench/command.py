"""Correctness and speed of the QLoRA linear layer, implementations side by side.

On a GPU (``--gpu``, or any machine with CUDA) it times, on Llama-3.1-8B layer
shapes, the forward, the backward (dX, dA, dB) and both together of:

  fused           lora_lab.kernels.fused_qlora_linear: NF4 decoded inside the Triton matmuls
  dequant+cublas  dequantize W to a temporary, x @ W^T, then the adapter path with addmm (Unsloth's matmul_lora)
  bnb+peft        peft's LoRA on a bitsandbytes Linear4bit: what most people fine-tune with
  dense           W already dequantized to x's dtype, then the same matmuls: the ideal, at ~4x the memory
  reference       lora_lab.lora.qlora_linear, the readable op every kernel must equal

Without a GPU it compares the reference with bitsandbytes + peft on the CPU:
the layer at a few shapes and a whole training step of the tiny model. Kernel
timings need a GPU: on the CPU the Triton kernels run under Triton's interpreter.

Every result is re-checked against float64 after timing; a wrong result is
marked WRONG and the command exits 1. See lora_lab/bench/timing.py for how the
timing is made trustworthy, and benchmarks/README.md for results.

examples:
  lora-lab bench                                    # CPU: about 30 s on 2 cores, with a progress bar
  lora-lab bench --gpu --quick --json bench.json    # what benchmarks/gpu_check.sh runs (about 4 minutes)
  lora-lab bench --gpu --shapes 4096x14336 --tokens 1,4096 --ranks 16 --ops forward --plot times.png
  lora-lab bench --plan                             # the static performance model (any machine; measured on a GPU)
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import logging
import os
import re
import sys
import time
from pathlib import Path

import torch

from lora_lab.bench.cases import DTYPES, OPS, Case
from lora_lab.bench.impls import IMPLS, fast_dequantizer, unavailable
from lora_lab.bench.model_step import large_vocab_records, model_step_records
from lora_lab.bench.report import default_json_path, device_name, format_table, plot, summary_lines, write_json
from lora_lab.bench.timing import CudaEventTimer, PerfCounterTimer, Settings, measure_case, measure_roofline
from lora_lab.nf4 import NF4Tensor, quantize_nf4

LLAMA_3_1_8B_SHAPES = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))  # (K, N): q/o, k/v, gate/up, down
GPU_TOKENS, GPU_RANKS, GPU_DTYPES = (1, 16, 64, 512, 4096, 16384), (16, 64), ("bf16", "fp16")
QUICK = dict(shapes=((4096, 4096), (4096, 14336)), tokens=(16, 4096), ranks=(16,), dtypes=("bf16",), time_budget=210.0)
CPU_SHAPES, CPU_TOKENS, CPU_RANKS, CPU_DTYPES = ((1024, 1024), (2048, 512)), (16, 256), (16,), ("fp32",)
GPU_IMPLS = ("fused", "dequant+cublas", "bnb+peft", "dense", "reference")
CPU_IMPLS = ("reference", "bnb+peft", "dense")


# ----------------------------------------------------------------------------- the layer cases


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


# ----------------------------------------------------------------------------- command line


def _list_of(kind, what: str, allowed=None):
    def parse(text: str):
        items = [item.strip() for item in text.split(",") if item.strip()]
        try:
            values = tuple(kind(item) for item in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}") from None
        bad = [v for v in values if allowed is not None and v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected {what} from {', '.join(map(str, allowed))}, got {text!r}")
        return values

    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _shape(text: str) -> tuple[int, int]:
    """'4096x14336' -> (K, N) = (in_features, out_features); K must be a multiple of the NF4 blocksize, 64."""
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or int(match[1]) % 64 or int(match[2]) < 1:
        raise ValueError(text)
    return int(match[1]), int(match[2])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--gpu", action="store_true", help="the kernel benchmark on the CUDA device (fails without one)")
    where.add_argument("--cpu", action="store_true", help="the CPU benchmark even where a GPU exists")
    parser.add_argument("--quick", action="store_true", help="(GPU) a subset that fits in about 4 minutes on an H100/H200")
    parser.add_argument("--json", metavar="FILE", help="write results here (default: runs/bench/<date>-<device>.json)")
    parser.add_argument("--plot", metavar="FILE", help="also save a chart of time per implementation per case (PNG)")
    parser.add_argument("--shapes", type=_list_of(_shape, "KxN layer shapes (in x out features, K a multiple of 64)"),
                        help="layer shapes, e.g. 4096x4096,4096x14336 (default: Llama-3.1-8B's four on a GPU)")
    parser.add_argument("--tokens", type=_list_of(_positive, "positive token counts M"), help="rows of x, e.g. 1,16,4096")
    parser.add_argument("--ranks", type=_list_of(_positive, "positive LoRA ranks"), help="LoRA ranks, e.g. 16,64")
    parser.add_argument("--dtypes", type=_list_of(str, "dtypes", tuple(DTYPES)), help="bf16, fp16 and/or fp32")
    parser.add_argument("--ops", type=_list_of(str, "ops", OPS), help="forward, backward and/or step (default: all three)")
    parser.add_argument("--impls", type=_list_of(str, "implementations", tuple(IMPLS)), help=f"from {', '.join(IMPLS)}")
    parser.add_argument("--repeats", type=_positive, help="timed trials per implementation (default: as many as fit a budget)")
    parser.add_argument("--input-sets", type=_positive, default=3, help="seeded input sets the trials rotate among (default 3)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="start no new case after this many seconds (default: 210 with --gpu --quick, else none)")
    parser.add_argument("--no-model", action="store_true", help="skip the tiny model's training step (CPU)")
    parser.add_argument("--vocab-step", action="store_true", help="(CPU) also a step with Llama 3's 128,256-token "
                        "vocabulary, batch 16 x sequence 64: every position's logits vs only the labelled ones (~1 min)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: on a busy machine a multi-threaded matmul waits for "
                        "descheduled threads and measures the scheduler; 0 keeps torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plan", action="store_true",
                        help="print the static performance model of the kernels on Llama-3.1-8B layers (H200, H100, A100) "
                        "from their compiled code, no GPU needed; on a GPU with measured times (lora_lab/bench/plan.py)")


def run(args: argparse.Namespace) -> int:
    if args.plan:
        from lora_lab.bench.plan import run_plan

        return run_plan()
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
    impls, setup_failures = [], []
    for name in args.impls or (GPU_IMPLS if on_gpu else CPU_IMPLS):
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
    path = Path(args.json) if args.json else default_json_path(name, date)
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

    def save(records, failures, skipped) -> None:  # after every case, so a run cut short still leaves its results
        results.update(records=[r.to_json() for r in records], failures=failures, skipped_cases=skipped)
        write_json(results, path)

    from tqdm import tqdm

    cases = layer_cases(shapes, tokens, ranks, dtypes, args.ops or OPS)
    with_model = not on_gpu and not args.no_model and not unavailable("bnb+peft", device)
    progress = tqdm(total=len(cases) * len(impls) + 2 * with_model, file=sys.stderr, unit="run", leave=False)
    deadline = None if budget is None else started + budget
    records, failures, skipped = run_layers(cases, impls, timer, roofline, settings, deadline, progress, save)
    failures = setup_failures + failures
    if with_model:
        progress.set_description("training step of the tiny model")
        try:
            records += model_step_records(timer, settings)
        except Exception as exc:  # noqa: BLE001 - report it with the rest
            error = f"{type(exc).__name__}: {exc}"
            failures.append({"case": "tiny-model training step", "impl": "reference, bnb+peft", "error": error})
        progress.update(2)
    if args.vocab_step and not on_gpu:
        progress.set_description("training step with a 128,256-token vocabulary")
        records += large_vocab_records(timer, settings)
    progress.close()
    if skipped:
        notes.append(f"{len(skipped)} case(s) skipped: the time budget of {budget:g} s ran out")
    save(records, failures, skipped)

    threads = "" if on_gpu else f", {torch.get_num_threads()} CPU thread(s)"
    elapsed = time.monotonic() - started
    print(f"lora-lab bench on {name}{threads}: torch {torch.__version__}, triton {triton_version}, {elapsed:.0f} s")
    print(f"roofline: copy {roofline.copy_gbps:.0f} GB/s, matmul "
          + ", ".join(f"{d} {t:.3g} TFLOP/s" for d, t in roofline.matmul_tflops.items()))
    print(format_table(records, results["roofline"]))
    for line in summary_lines(records):
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
