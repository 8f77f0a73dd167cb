"""What ``lora-lab bench`` shows for its records: the table, the summary, the chart and the results file.

Presentation only: nothing here measures or judges; it reads ``Record``s
(and the roofline) and lays them out for people, matplotlib, or JSON.
"""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path

import torch

from lora_lab.bench.timing import Record

BASELINE = "bnb+peft"  # the "vs baseline" column: how many times faster than what people use today
STORAGE_BASELINE = "bitsandbytes"  # NF4 quantize and dequantize have no peft part


def _group_key(record: Record) -> tuple:
    return (record.scope, record.op, record.M, record.K, record.N, record.r, record.dtype)


def _baseline_of(scope: str) -> str:
    return STORAGE_BASELINE if scope == "storage" else BASELINE


def _baseline_ms(records: list[Record]) -> dict[tuple, float]:
    return {_group_key(r): r.ms for r in records if r.impl == _baseline_of(r.scope) and r.correct}


def _storage_line(record: Record) -> str:
    moved = record.gbps * 1e9 * record.ms * 1e-3
    line = f"NF4 {record.op} of a {record.N} x {record.K} fp32 weight (blocksize 64, double quant): {moved / 1e6:.4g} MB moved"
    if record.floor_ms is not None:
        line += f", floor {record.floor_ms:.4g} ms at the copy bandwidth (memory-bound)"
    return line


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
    baseline = _baseline_ms(records)
    header = (
        f"{'impl':<16}{'ms':>10}{'TFLOP/s':>10}{'GB/s':>10}{'%floor':>8}{'peak MB':>10}{'max rel err':>13}{'vs baseline':>13}"
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
            elif record.scope == "storage":
                lines.append(_storage_line(record))
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
    lines.append(f"vs baseline: {BASELINE}'s time over this one's ({STORAGE_BASELINE}' alone for NF4 storage)")
    return "\n".join(lines)


def summary_lines(records: list[Record]) -> list[str]:
    """Geometric-mean speed of each layer implementation relative to bnb+peft, per op (correct results only)."""
    baseline = _baseline_ms(records)
    ratios: dict[tuple[str, str], list[float]] = {}
    for record in records:
        key = _group_key(record)
        if record.scope == "layer" and record.impl != BASELINE and record.correct and key in baseline:
            ratios.setdefault((record.op, record.impl), []).append(baseline[key] / record.ms)
    lines = []
    for (op, impl), values in sorted(ratios.items()):
        mean = torch.tensor(values, dtype=torch.float64).log().mean().exp().item()
        what = f"layer {op}"
        verdict = "faster than" if mean >= 1 else "slower than"
        lines.append(f"  {what:<22} {impl:<15} {mean:5.2f}x the speed of {BASELINE} ({verdict}; {len(values)} case(s))")
    return lines


def baseline_lines(records: list[Record]) -> list[str]:
    """The reference's time over bitsandbytes' / peft's, side by side: NF4 quantize, dequantize and the tiny model's
    step (below 1: faster). Dequantize is also set against its memory-bound floors: the bytes it moves at the copy
    bandwidth, and the measured time to write a fresh output of its size."""
    by = {(r.scope, r.op, r.impl): r for r in records if r.correct and r.scope in ("storage", "model")}
    rows = [("quantize 4096 x 4096", ("storage", "quantize"), "bitsandbytes'"),
            ("dequantize 4096 x 4096", ("storage", "dequantize"), "bitsandbytes'"),
            ("tiny-model QLoRA step", ("model", "step"), "peft + bitsandbytes'")]
    lines = []
    for what, (scope, op), whose in rows:
        ours, theirs = by.get((scope, op, "reference")), by.get((scope, op, _baseline_of(scope)))
        if ours is None or theirs is None:
            continue
        line = f"  {what:<24}{ours.ms / theirs.ms:6.2f}x {whose} time ({ours.ms:.3g} ms against {theirs.ms:.3g} ms)"
        if op == "dequantize":
            fresh = by.get((scope, op, "fresh output"))
            if ours.floor_ms is not None:
                line += f"; {ours.ms / ours.floor_ms:.3g}x its memory-bound estimate ({ours.floor_ms:.3g} ms at copy bandwidth)"
            if fresh is not None:
                line += f", {ours.ms / fresh.ms:.3g}x writing a fresh output of its size ({fresh.ms:.3g} ms)"
        lines.append(line)
    return ["reference against bitsandbytes and peft (median of interleaved runs; below 1x is faster):", *lines] if lines else []


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


def default_json_path(device: str, date: str, tag: str = "") -> Path:
    """runs/bench/<date>-<device>[-<tag>].json: under runs/, not among the repository's files (results to publish are
    copied into benchmarks/results/ on purpose); ``tag`` names a selection ("partial", "quick")."""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:48]
    return Path("runs") / "bench" / f"{date}-{slug}{'-' + tag if tag else ''}.json"


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
