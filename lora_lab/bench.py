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
marked WRONG and the command exits 1. See lora_lab/benchmarking.py for how the
timing is made trustworthy, and benchmarks/README.md for results.

examples:
  lora-lab bench                                    # CPU: about 30 s on 2 cores, with a progress bar
  lora-lab bench --gpu --quick --json bench.json    # what benchmarks/gpu_check.sh runs (about 4 minutes)
  lora-lab bench --gpu --shapes 4096x14336 --tokens 1,4096 --ranks 16 --ops forward --plot times.png
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lora_lab.benchmarking import (
    DTYPES,
    OPS,
    Bound,
    Case,
    CudaEventTimer,
    Impl,
    PerfCounterTimer,
    Record,
    Settings,
    Timer,
    measure_case,
    measure_roofline,
)
from lora_lab.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

LLAMA_3_1_8B_SHAPES = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))  # (K, N): q/o, k/v, gate/up, down
GPU_TOKENS, GPU_RANKS, GPU_DTYPES = (1, 16, 64, 512, 4096, 16384), (16, 64), ("bf16", "fp16")
QUICK = dict(shapes=((4096, 4096), (4096, 14336)), tokens=(16, 4096), ranks=(16,), dtypes=("bf16",), time_budget=210.0)
CPU_SHAPES, CPU_TOKENS, CPU_RANKS, CPU_DTYPES = ((1024, 1024), (2048, 512)), (16, 256), (16,), ("fp32",)
GPU_IMPLS = ("fused", "dequant+cublas", "bnb+peft", "dense", "reference")
CPU_IMPLS = ("reference", "bnb+peft", "dense")
BASELINE = "bnb+peft"  # the "vs bnb+peft" column: how many times faster than what people use today
MODEL_LOSS_TOLERANCE = 1e-4  # fp32, same NF4 numbers: only summation order differs between the two stacks


# ----------------------------------------------------------------------------- implementations


class _DequantMatmulLoRA(torch.autograd.Function):
    """Unsloth's matmul_lora: W = dequantize() to a temporary, then cuBLAS, with the adapter path added by addmm."""

    @staticmethod
    def forward(ctx, x, dense_weight, lora_A, lora_B, scaling):
        x2d = x.reshape(-1, x.shape[-1])
        y = x2d @ dense_weight().t()
        xa = x2d @ lora_A.t()
        y.addmm_(xa, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x2d, xa, lora_A, lora_B)
        ctx.dense_weight, ctx.scaling, ctx.x_shape = dense_weight, scaling, x.shape
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        x2d, xa, lora_A, lora_B = ctx.saved_tensors
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        dy_b = dy @ lora_B
        grad_x = (dy @ ctx.dense_weight()).addmm_(dy_b, lora_A, alpha=ctx.scaling)  # W dequantized again
        grad_A = (dy_b.t() @ x2d).mul_(ctx.scaling)
        grad_B = (dy.t() @ xa).mul_(ctx.scaling)
        return grad_x.reshape(ctx.x_shape), None, grad_A, grad_B, None


def _functional(op):
    def setup(weight: NF4Tensor, scaling: float, dtype: torch.dtype):
        return (lambda A, B: Bound(lambda x: op(x, weight, A, B, scaling), A, B)), weight.nbytes

    return setup


def _fast_dequantizer(weight: NF4Tensor) -> tuple[str, Callable[[], torch.Tensor]]:
    """The fastest dequantizer at hand: bitsandbytes' CUDA kernel (as Unsloth uses), else ours."""
    if weight.device.type == "cuda":
        try:
            import bitsandbytes.functional as bnb_functional

            packed, state = weight.to_bnb()
            return "bitsandbytes dequantize_4bit", lambda: bnb_functional.dequantize_4bit(packed, state)
        except Exception:  # noqa: BLE001 - fall back to the next-fastest
            try:
                from lora_lab.kernels import nf4_dequantize

                return "lora_lab.kernels.nf4_dequantize", lambda: nf4_dequantize(weight)
            except Exception:  # noqa: BLE001
                pass
    return "lora_lab.nf4.dequantize_nf4", lambda: dequantize_nf4(weight)


def _setup_dequant_cublas(weight: NF4Tensor, scaling: float, dtype: torch.dtype):
    _, dequantize = _fast_dequantizer(weight)
    dense = lambda: dequantize().to(dtype)  # noqa: E731
    return (lambda A, B: Bound(lambda x: _DequantMatmulLoRA.apply(x, dense, A, B, scaling), A, B)), weight.nbytes


def _setup_dense(weight: NF4Tensor, scaling: float, dtype: torch.dtype):
    resident = dequantize_nf4(weight).to(dtype)
    return (lambda A, B: Bound(lambda x: _DequantMatmulLoRA.apply(x, lambda: resident, A, B, scaling), A, B)), (
        resident.numel() * resident.element_size()
    )


def _setup_bnb_peft(weight: NF4Tensor, scaling: float, dtype: torch.dtype):
    """One peft layer per case; each trial copies its adapters in (untimed) and clears their gradients."""
    import peft

    from lora_lab.conformance.oracles import bnb_linear4bit

    holder = nn.Module()
    holder.proj = bnb_linear4bit(weight, None, compute_dtype=dtype)
    layer = None

    def bind(A: torch.Tensor, B: torch.Tensor) -> Bound:
        nonlocal layer
        if layer is None:
            config = peft.LoraConfig(r=A.shape[0], lora_alpha=scaling * A.shape[0], target_modules=["proj"], lora_dropout=0.0)
            layer = peft.get_peft_model(holder, config).base_model.model.proj
            layer.lora_A.to(device=A.device, dtype=dtype)
            layer.lora_B.to(device=A.device, dtype=dtype)
            layer.scaling["default"] = scaling
            layer.train()
        pA, pB = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            pA.copy_(A)
            pB.copy_(B)
        pA.grad = pB.grad = None
        return Bound(layer, pA, pB)

    return bind, weight.nbytes


def _fused(x, weight, A, B, scaling):
    from lora_lab.kernels import fused_qlora_linear

    return fused_qlora_linear(x, weight, A, B, scaling)


def _reference(x, weight, A, B, scaling):
    from lora_lab.lora import qlora_linear

    return qlora_linear(x, weight, A, B, scaling)


IMPLS = {
    "fused": Impl("fused", "lora_lab.kernels.fused_qlora_linear (Triton, NF4 decoded in the matmul)", _functional(_fused)),
    "dequant+cublas": Impl("dequant+cublas", "dequantize to a temporary, then torch matmuls", _setup_dequant_cublas),
    "bnb+peft": Impl("bnb+peft", "peft LoRA on a bitsandbytes Linear4bit", _setup_bnb_peft),
    "dense": Impl("dense", "weight already dequantized to x's dtype (the ideal; 4x the weight memory)", _setup_dense),
    "reference": Impl("reference", "lora_lab.lora.qlora_linear", _functional(_reference)),
}


def unavailable(name: str, device: torch.device) -> str:
    """Why an implementation cannot run here, or "" when it can."""
    try:
        if name == "bnb+peft":
            import bitsandbytes  # noqa: F401
            import peft  # noqa: F401
        if name == "fused":
            import lora_lab.kernels as kernels

            if device.type == "cpu" and kernels.INTERPRETING:
                return ""  # explicitly requested on the CPU: runs under Triton's interpreter, slowly
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return ""


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


# ----------------------------------------------------------------------------- the tiny model's training step


def tiny_model_pair(r: int = 8, alpha: float = 16, seed: int = 0):
    """lora_lab's QLoRA tiny Llama, and the same model as peft + bitsandbytes Linear4bit holding the same NF4 bytes.

    Both start from identical numbers: every linear layer but lm_head is NF4 in
    both (as in real QLoRA), the bitsandbytes layers wrap our NF4 weights without
    re-quantizing, and peft's adapters (on the targets only) are overwritten with ours.
    """
    import peft

    from lora_lab.conformance.oracles import bnb_linear4bit
    from lora_lab.lora import NF4Linear, QLoRALinear
    from lora_lab.model import DEFAULT_TARGETS, apply_qlora, tiny_llama

    ours = apply_qlora(tiny_llama(seed), DEFAULT_TARGETS, r=r, alpha=alpha)
    theirs = tiny_llama(seed)
    for name, layer in ours.named_modules():
        if isinstance(layer, NF4Linear):  # QLoRALinear too: the targets and the rest of the base alike
            parent, _, child = name.rpartition(".")
            setattr(theirs.get_submodule(parent), child, bnb_linear4bit(layer.weight, layer.bias))
    names = [name for name, module in ours.named_modules() if isinstance(module, QLoRALinear)]
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(DEFAULT_TARGETS), lora_dropout=0.0)
    theirs = peft.get_peft_model(theirs, config)
    with torch.no_grad():
        for name in names:
            mine, peft_layer = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(mine.lora_A)
            peft_layer.lora_B["default"].weight.copy_(mine.lora_B)
    return ours.train(), theirs.train()


def _linear_flops_per_token(model: nn.Module) -> int:
    """2 x (in x out) summed over the linear layers (adapters included): forward FLOPs per token, attention aside."""
    from lora_lab.lora import NF4Linear, QLoRALinear

    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, NF4Linear)):
            total += module.in_features * module.out_features
        if isinstance(module, QLoRALinear):
            total += module.r * (module.in_features + module.out_features)
    return 2 * total


def model_step_records(timer: Timer, settings: Settings, r: int = 8, alpha: float = 16, batch_size: int = 8):
    """Time ``training_step`` on both tiny models, alternating step by step; their losses must agree.

    Both take the same batch each step, so they train identically up to
    rounding; ``max_rel_err`` is the largest relative difference between their
    losses over every step, which shows they did the same work.
    """
    from lora_lab.data import collate, generate_products
    from lora_lab.train import training_step

    with warnings.catch_warnings():  # peft asks transformers about gradient checkpointing by a deprecated name
        warnings.simplefilter("ignore", FutureWarning)
        ours, theirs = tiny_model_pair(r, alpha, settings.seed)
    batch = collate(generate_products(batch_size, seed=settings.seed))
    models = {
        "reference": (ours, torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)),
        "bnb+peft": (theirs, torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-3)),
    }
    losses: dict[str, list[float]] = {name: [] for name in models}
    step = lambda name: losses[name].append(training_step(models[name][0], batch, models[name][1]))  # noqa: E731
    for name in models:  # warm-up, and an estimate of how many steps fit the budget
        step(name)
    estimate = sum(timer.time_call(lambda name=name: step(name)) for name in models)
    repeats = settings.repeats or int(min(30, max(settings.min_repeats, 30 * settings.budget_ms / max(estimate, 1e-3))))
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name in models:
            times[name].append(timer.time_call(lambda name=name: step(name)))
    peaks = {name: timer.peak_memory_mb(lambda name=name: step(name)) for name in models}
    err = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(losses["reference"], losses["bnb+peft"]))
    correct = err <= MODEL_LOSS_TOLERANCE
    tokens, hidden = batch["input_ids"].numel(), ours.config.hidden_size
    flops = 2 * tokens * _linear_flops_per_token(ours)  # forward + input gradients: twice the forward's linear FLOPs
    note = "" if correct else f"losses differ by {err:.3g} (relative), more than {MODEL_LOSS_TOLERANCE:g}"
    records = []
    for name in models:
        ms = statistics.median(times[name])
        records.append(Record(
            op="step", M=tokens, N=hidden, K=hidden, r=r, dtype="fp32", impl=name, ms=ms,
            tflops=flops / (ms * 1e-3) / 1e12, gbps=0.0, peak_mem_mb=peaks[name], max_rel_err=err,
            scope="model", correct=correct, note=note,
        ))
    return records


# ----------------------------------------------------------------------------- report: table, summary, chart, JSON


def _group_key(record: Record) -> tuple:
    return (record.scope, record.op, record.M, record.K, record.N, record.r, record.dtype)


def _case_line(record: Record, roofline: dict | None) -> str:
    """The case's cost: FLOPs, the fewest bytes it must move, and the roofline floor (from any correct record of it)."""
    seconds = record.ms * 1e-3
    flops, nbytes = record.tflops * 1e12 * seconds, record.gbps * 1e9 * seconds
    case = f"{record.op} M={record.M} {record.K}->{record.N} r={record.r} {record.dtype}"
    line = f"{case}: {flops / 1e9:.4g} GFLOP, at least {nbytes / 1e6:.4g} MB moved"
    if roofline and record.floor_ms is not None:
        compute_ms = flops / (roofline["matmul_tflops"][record.dtype] * 1e12) * 1e3
        bound = "compute" if compute_ms >= record.floor_ms * 0.999 else "memory"
        line += f", floor {record.floor_ms:.4g} ms ({bound}-bound)"
    return line


def format_table(records: list[Record], roofline: dict | None = None) -> str:
    """One row per implementation, cases separated by their cost line; WRONG results show no speed at all."""
    baseline = {_group_key(r): r.ms for r in records if r.impl == BASELINE and r.correct}
    header = (
        f"{'impl':<16}{'ms':>10}{'TFLOP/s':>10}{'GB/s':>10}{'%floor':>8}{'peak MB':>10}{'max rel err':>13}{'vs ' + BASELINE:>13}"
    )
    lines = [header, "-" * len(header)]
    previous = None
    for record in records:
        key = _group_key(record)
        if key != previous:
            if previous is not None:
                lines.append("")
            if record.scope == "model":
                lines.append(f"training step of the tiny model: {record.M} tokens, hidden {record.K}, r={record.r}, fp32")
            else:
                lines.append(_case_line(record, roofline))
        previous = key
        head = f"  {record.impl:<14}"
        error = "not finite" if record.max_rel_err is None else f"{record.max_rel_err:.2e}"
        if not record.correct:
            lines.append(f"{head}{'WRONG':>10}{'-':>10}{'-':>10}{'-':>8}{record.peak_mem_mb:>10.1f}{error:>13}{'-':>13}")
            continue
        floor = "-" if record.pct_of_floor is None else f"{record.pct_of_floor:.2g}"
        gbps = "-" if record.scope == "model" else f"{record.gbps:.4g}"
        ratio = f"{baseline[key] / record.ms:.2f}x" if key in baseline else "-"
        lines.append(
            f"{head}{record.ms:>10.4g}{record.tflops:>10.4g}{gbps:>10}{floor:>8}{record.peak_mem_mb:>10.1f}{error:>13}{ratio:>13}"
        )
    return "\n".join(lines)


def summary_lines(records: list[Record]) -> list[str]:
    """Geometric-mean speed of each implementation relative to bnb+peft, per op (correct results only)."""
    baseline = {_group_key(r): r.ms for r in records if r.impl == BASELINE and r.correct}
    ratios: dict[tuple[str, str, str], list[float]] = {}
    for record in records:
        key = _group_key(record)
        if record.impl != BASELINE and record.correct and key in baseline:
            ratios.setdefault((record.scope, record.op, record.impl), []).append(baseline[key] / record.ms)
    lines = []
    for (scope, op, impl), values in sorted(ratios.items()):
        mean = torch.tensor(values, dtype=torch.float64).log().mean().exp().item()
        what = f"{op} of the tiny model" if scope == "model" else f"layer {op}"
        verdict = "faster than" if mean >= 1 else "slower than"
        lines.append(f"  {what:<22} {impl:<15} {mean:5.2f}x the speed of {BASELINE} ({verdict}; {len(values)} case(s))")
    return lines


def plot(records: list[Record], path: str) -> None:
    """Speed relative to bnb+peft (or the reference) per case, a panel per op, dtype and rank; wrong results left out.

    Relative speed on a linear axis starting at 0 reads at a glance ("the bar is
    three times as tall"); each case's label carries the baseline's absolute time.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    baseline_impl = BASELINE if any(r.impl == BASELINE and r.correct for r in records) else "reference"
    baseline = {_group_key(r): r.ms for r in records if r.impl == baseline_impl and r.correct}
    shown = [r for r in records if r.correct and _group_key(r) in baseline]
    panel_of = lambda r: (r.scope, r.op, r.dtype, r.r)  # noqa: E731
    panels = list(dict.fromkeys(panel_of(r) for r in shown))
    impls = list(dict.fromkeys(r.impl for r in shown))
    widest = max((len({_group_key(r) for r in shown if panel_of(r) == p}) for p in panels), default=1)
    rows = max(1, len(panels))
    fig, axes = plt.subplots(rows, 1, figsize=(min(40.0, max(7.0, 1.1 * widest + 2.5)), 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        mine = [r for r in shown if panel_of(r) == panel]
        keys = list(dict.fromkeys(_group_key(r) for r in mine))
        here = [impl for impl in impls if any(r.impl == impl for r in mine)]
        width = 0.8 / len(here)
        for j, impl in enumerate(here):
            bars = [r for r in mine if r.impl == impl]
            xs = [keys.index(_group_key(r)) + (j - (len(here) - 1) / 2) * width for r in bars]
            ax.bar(xs, [baseline[_group_key(r)] / r.ms for r in bars], width, color=f"C{impls.index(impl)}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"M={k[2]}\n{k[3]}->{k[4]}\n{baseline[k]:.3g} ms" for k in keys], fontsize=7)
        ax.set_ylabel(f"speed vs {baseline_impl}\n(higher is better)")
        scope, op, dtype, rank = panel
        what = "tiny-model training step" if scope == "model" else f"QLoRA linear layer, {op}"
        ax.set_title(f"{what}, r={rank}, {dtype} (tick: {baseline_impl}'s time)", fontsize=10)
    fig.legend(handles=[Patch(color=f"C{j}", label=impl) for j, impl in enumerate(impls)], loc="upper right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}"


def default_json_path(device: str, date: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:48]
    return Path("benchmarks") / "results" / f"{date}-{slug}.json"


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")


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
    parser.add_argument("--json", metavar="FILE", help="write results here (default: benchmarks/results/<date>-<device>.json)")
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
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: on a busy machine a multi-threaded matmul waits for "
                        "descheduled threads and measures the scheduler; 0 keeps torch's default)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
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
        dequantizer, _ = _fast_dequantizer(frozen_weight(64, 64, torch.float32, 0, device))
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
