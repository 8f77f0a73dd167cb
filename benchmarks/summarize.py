"""Turn a results file of ``lora-lab bench`` into the markdown tables of benchmarks/README.md.

    python benchmarks/summarize.py benchmarks/results/2026-12-01-nvidia-h200.json

Tables are generated, never typed, so the README cannot drift from the JSON it
cites. One table per op: a row per case, a column per implementation with its
median time in ms; the fastest correct one is bold, a wrong one says WRONG
(the JSON's ``correct`` is false: it failed the float64 re-check after timing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lora_lab.bench.timing import validate_results

TITLES = {
    ("model", "step"): "Training step of the tiny model",
    ("model", "step-vocab-128k"): "Training step with Llama 3's 128,256-token vocabulary",
    ("storage", "quantize"): "NF4 quantize of one weight (blocksize 64, double quant)",
    ("storage", "dequantize"): "NF4 dequantize of one weight (blocksize 64, double quant)",
}
FIRST_COLUMN = {"model": "tokens", "storage": "elements"}


def _cell(record: dict | None, fastest: float | None) -> str:
    if record is None:
        return "-"
    if not record.get("correct", True):
        return "WRONG"
    text = f"{record['ms']:.3g}"
    return f"**{text}**" if record["ms"] == fastest else text


def markdown(results: dict) -> str:
    """Header lines (device, versions, roofline), then a table per (scope, op)."""
    records = results["records"]
    roofline = results.get("roofline") or {}
    rates = ", ".join(f"{d} {t:.3g} TFLOP/s" for d, t in (roofline.get("matmul_tflops") or {}).items())
    lines = [
        f"Device: {results['device']} ({results['date']}), torch {results['torch']}, triton {results['triton']}.",
        f"Measured roofline: copy {roofline.get('copy_gbps', float('nan')):.0f} GB/s, matmul {rates}." if roofline else "",
        "",
    ]
    groups: dict[tuple, dict[tuple, dict[str, dict]]] = {}
    for r in records:
        panel = (r.get("scope", "layer"), r["op"])
        case = (r["M"], r["K"], r["N"], r["r"], r["dtype"])
        groups.setdefault(panel, {}).setdefault(case, {})[r["impl"]] = r
    for (scope, op), cases in groups.items():
        impls = list(dict.fromkeys(impl for by_impl in cases.values() for impl in by_impl))
        lines += [f"**{TITLES.get((scope, op), f'Layer {op}')}** (median ms, lower is better)", ""]
        lines.append(f"| {FIRST_COLUMN.get(scope, 'M')} | K→N | r | dtype | " + " | ".join(impls) + " |")
        lines.append("|---:|---|---:|---|" + "---:|" * len(impls))
        for (M, K, N, r, dtype), by_impl in cases.items():
            correct = [x["ms"] for x in by_impl.values() if x.get("correct", True)]
            fastest = min(correct) if correct else None
            cells = " | ".join(_cell(by_impl.get(impl), fastest) for impl in impls)
            lines.append(f"| {M} | {K}→{N} | {r} | {dtype} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a JSON file written by lora-lab bench")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    problems = validate_results(results)
    if problems:
        print(f"{args.results} does not follow the results schema: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
