"""The compatibility matrix: one row per library, from the JSON that ``lora-lab verify --json`` writes.

    for t in bnb_functional peft_bnb torchao_nf4 hf_peft; do
        lora-lab verify lora_lab.targets.$t --json docs/compat/$t.json
    done
    python -m lora_lab.conformance.matrix docs/compat/*.json      # the Markdown table in the README

Each cell counts the checks of one group (semantic, interchange, training, bad
input, the rest) that passed out of those that ran; "not supported" and "not
provided" are listed apart, never counted as passes, and a pass whose oracle is
the library itself is marked "self-comparison". The table is made from the files,
so the README's numbers are the verifier's, not typed by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GROUPS = ("semantic", "interchange", "training", "bad input", "other")  # other: memory, bounds, loss, adamw


def _cell(results: list[dict]) -> str:
    ran = [r for r in results if r["status"] not in ("not supported", "not provided")]
    unsupported = sum(r["status"] == "not supported" for r in results)
    if not ran:
        return "n/s" if unsupported else "-"
    cell = f"{sum(r['status'] == 'passed' for r in ran)}/{len(ran)}"
    self_compared = sum(r["detail"].startswith("self-comparison") for r in ran)
    notes = [f"{self_compared} self-comparison"] * bool(self_compared) + [f"+{unsupported} n/s"] * bool(unsupported)
    return cell + (f" ({', '.join(notes)})" if notes else "")


def row(report: dict) -> str:
    """One Markdown table row: target, library versions, format, a cell per group, and the failing checks."""
    versions = ", ".join(f"{name} {version}" for name, version in report["libraries"].items() if name != "torch")
    grouped = {group: [r for r in report["results"] if (r["group"] if r["group"] in GROUPS else "other") == group]
               for group in GROUPS}
    cells = [_cell(grouped[group]) for group in GROUPS]
    failing = [r["check"] for r in report["results"] if r["status"] in ("failed", "error")]
    target = report["target"].rsplit(".", 1)[-1]
    return f"| `{target}` | {versions} | {report['format']} | " + " | ".join(cells) + f" | {', '.join(failing) or '-'} |"


def table(reports: list[dict]) -> str:
    header = "| target | libraries | weight format | " + " | ".join(GROUPS) + " | failing checks |"
    rule = "|" + "---|" * (4 + len(GROUPS))
    torch_versions = sorted({r["libraries"].get("torch") for r in reports} - {None})
    return "\n".join([header, rule, *(row(r) for r in reports), "", f"torch {', '.join(torch_versions)}, CPU."])


def main(argv: list[str] | None = None) -> int:
    paths = argv if argv is not None else sys.argv[1:]
    if not paths:
        print("usage: python -m lora_lab.conformance.matrix REPORT.json [REPORT.json ...]", file=sys.stderr)
        return 2
    print(table([json.loads(Path(p).read_text()) for p in paths]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
