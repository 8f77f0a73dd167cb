"""``lora-lab bench --plan``: the static performance model of the QLoRA forward on Llama-3.1-8B layers, on any machine.

Why
---
A benchmark needs a GPU; a model does not, and says what a benchmark should
find. For each GPU, layer shape, M (rows of x: 1 and 16 while generating, 128
and 4096 for prefill and training) and kernel path of ``fused_qlora_linear``
(the split-K small-M kernel, the fused NF4 kernel, dequantize + dense matmul),
the table gives the predicted forward time with and without CUDA graphs and the
fraction of HBM bandwidth (small M) or bf16 peak (large M) it reaches, then
every assumption with its reason (``plan_model`` is the model).

Two children supply its inputs, both defining the kernels compiled for a GPU
this machine need not have: the compile check (registers, shared memory and
the K loop's SASS of every kernel, the small-M reduction included, ``--subset ci --sass``
at r = 16) and ``launch_count``
(what each path launches at each shape). ``--json FILE`` writes the
assumptions and one record per GPU, layer, M and path with every input and
output of the model.

On a GPU, ``--plan`` also times the layer forward on each path (the one
``fused_qlora_linear`` takes first, then the forced ones while a time budget
lasts) and prints it beside the prediction.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lora_lab.bench.launch_count import forced_path
from lora_lab.bench.plan_model import ASSUMPTIONS, GPUS, RANK, TOKENS, Row, llama_layers, plan_rows


def _child(module: str, log: str, *argv: str) -> subprocess.Popen:
    """A child that defines the kernels compiled (this process may be interpreting them), even without a GPU."""
    env = dict(os.environ, TRITON_INTERPRET="0", LORA_LAB_COMPILE_ONLY="1", LORA_LAB_AUTOTUNE="1")
    if torch.cuda.is_available():
        env.pop("LORA_LAB_COMPILE_ONLY")
    with open(log, "w") as out:  # a file, not a pipe: two children at once must never block on a full pipe
        return subprocess.Popen([sys.executable, "-m", module, *argv], stdout=out, stderr=subprocess.STDOUT, env=env)


def _finish(child: subprocess.Popen, log: str, out: str, what: str):
    if child.wait() or not os.path.exists(out):
        with open(log) as f:
            raise RuntimeError(f"{what} failed:\n{f.read()[-6000:]}")
    with open(out) as f:
        return json.load(f)


def compiled_and_counted(shapes: list[list[int]]) -> tuple[list[dict], dict]:
    """The compile check's CI subset with SASS, and the launches of each path at each (M, N, K), two children at once."""
    with tempfile.TemporaryDirectory() as folder:
        compiled, compile_log, shapes_file, counted, count_log = (
            os.path.join(folder, name) for name in ("c.json", "c.log", "s.json", "l.json", "l.log"))
        with open(shapes_file, "w") as f:
            json.dump(shapes, f)
        compiling = _child("lora_lab.kernels.compile.compile_check", compile_log, "--subset", "ci", "--sass",
                           "--rank", str(RANK), "--json", compiled)  # the model's rank: the other is not read
        counting = _child("lora_lab.bench.launch_count", count_log, shapes_file, counted)
        return (_finish(compiling, compile_log, compiled, "the compile check"),
                _finish(counting, count_log, counted, "counting the launches"))


def measure(rows: list[Row], budget_s: float = 60.0) -> None:
    """On a GPU: the median forward time of fused_qlora_linear on each row's path (bf16, r=16, blocksize 64, dq).

    The paths the op takes are measured first; the forced ones (``LORA_LAB_KERNEL_PATH``) while ``budget_s``
    lasts, so that ``gpu_check.sh``'s time cap holds.
    """
    import triton

    from lora_lab.kernels import fused_qlora_linear
    from lora_lab.nf4 import quantize_nf4

    module = importlib.import_module("lora_lab.kernels.fused_qlora_linear")
    here, start = torch.cuda.get_device_name(), time.monotonic()
    weights = {}
    for row in sorted((r for r in rows if r.gpu.name in here), key=lambda r: not r.auto):  # only this GPU's rows
        if not row.auto and time.monotonic() - start > budget_s:
            break
        if (row.n, row.k) not in weights:
            weights.clear()
            weights[(row.n, row.k)] = quantize_nf4(torch.randn(row.n, row.k, device="cuda") * 0.02, 64, True)
        args = (torch.randn(row.m, row.k, device="cuda", dtype=torch.bfloat16), weights[(row.n, row.k)],
                torch.randn(RANK, row.k, device="cuda", dtype=torch.bfloat16) / 64,
                torch.randn(row.n, RANK, device="cuda", dtype=torch.bfloat16), 2.0)
        with torch.no_grad(), forced_path(module, "auto" if row.auto else row.path):
            row.measured_us = 1e3 * triton.testing.do_bench(lambda args=args: fused_qlora_linear(*args))


def _short(name: str) -> str:
    return name.removeprefix("qlora_").replace("_kernel", "")


def format_plan(rows: list[Row]) -> str:
    """One table per GPU, a row per (layer, M, path); then what the columns are and every assumption."""
    lines = []
    for gpu_name in dict.fromkeys(r.gpu.name for r in rows):
        gpu = GPUS[gpu_name]
        mine = [r for r in rows if r.gpu.name == gpu_name]
        measured = any(r.measured_us for r in mine)
        lines.append(f"\n{gpu.name}: {gpu.hbm_tbps} TB/s HBM, {gpu.bf16_tflops:g} TFLOP/s dense bf16, {gpu.sms} SMs "
                     f"({gpu.arch})")
        lines.append(f"{'layer':<14} {'M':>5} {'path':<8} {'launch':>6} {'MB':>7} {'main kernel, tile':<34} "
                     f"{'prog/SM':>7} {'blk/SM':>6} {'issue':>6} {'bound':<8} {'us':>7} {'eager':>7} {'%HBM':>5} "
                     f"{'%peak':>5}" + (f" {'measured':>8} {'/pred':>5}" if measured else ""))
        previous = None
        for r in mine:
            if previous is not None and (r.layer, r.m) != previous:
                lines.append("")
            previous = (r.layer, r.m)
            main = r.main
            launches = f"{sum(t.kind == 'triton' for t in r.kernels)}+{sum(t.kind == 'torch' for t in r.kernels)}"
            programs = "" if main.programs is None else f"{main.programs / gpu.sms:.1f}"
            line = (f"{r.layer:<14} {r.m:>5} {r.path + ('*' if r.auto else ''):<8} {launches:>6} "
                    f"{sum(t.bytes for t in r.kernels) / 1e6:>7.1f} {(_short(main.name) + ' ' + main.config)[:34]:<34} "
                    f"{programs:>7} {main.occupancy or '':>6} {main.issue_us:>6.1f} {r.bound:<8} "
                    f"{r.predicted_us:>7.1f} {r.eager_us:>7.1f} {r.hbm_fraction:>5.0%} {r.peak_fraction:>5.0%}")
            if r.measured_us:
                line += f" {r.measured_us:>8.1f} {r.measured_us / r.predicted_us:>5.2f}"
            lines.append(line)
    lines.append(
        "\nThe forward in bf16, r = 16, NF4 blocksize 64 with double quantization. path: * is the one fused_qlora_linear "
        "takes at that M (the others forced with LORA_LAB_KERNEL_PATH). launch: Triton + torch kernels per call, "
        "counted from the code. MB: the bytes those kernels move (each tensor once). main kernel: the launch that "
        "takes longest, with the compiled config the model picked; prog/SM: its programs per SM; blk/SM: the blocks "
        "its registers and shared memory let an SM hold; issue: its K loop's SASS instructions issued, in us. "
        "bound: where most of the time goes. us: predicted with CUDA graphs; eager: without. %HBM: the least bytes a "
        "forward moves (NF4 W, bf16 x/y/A/B) at datasheet bandwidth over the predicted time; %peak: its FLOPs at "
        "dense bf16 peak over the predicted time (the first matters at small M, the second at large M). measured (on a "
        "GPU): triton's do_bench median, each call after an L2-clearing kernel that the host's launches hide behind, "
        "so its kernels run back to back as in a graph: /pred compares it with the us column."
    )
    lines.append("\nAssumptions (lora_lab/bench/plan_model.py ASSUMPTIONS):")
    for name, a in rows[0].assume.items() if rows else ():
        lines.append(f"  {name} = {a.value:g} {a.unit}: {a.why}")
    return "\n".join(lines)


def plan_json(rows: list[Row]) -> dict:
    """The assumptions once and one record per (GPU, layer, M, path) with every input and output of the model."""
    assume = rows[0].assume if rows else ASSUMPTIONS
    return {"assumptions": {name: asdict(a) for name, a in assume.items()}, "records": [r.to_json() for r in rows]}


def run_plan(json_path: str | None = None, gpus=tuple(GPUS), tokens=TOKENS) -> int:
    """Print the model (and on a GPU, the measured times), and write it to ``json_path``; 0 on success."""
    shapes = sorted({(m, n, k) for _, n, k in llama_layers() for m in tokens}, key=lambda s: (s[1], s[2], s[0]))
    compiled, counted = compiled_and_counted([list(s) for s in shapes])
    rows = plan_rows(compiled, counted, gpus)
    order = {name: i for i, (name, _, _) in enumerate(llama_layers())}
    rows.sort(key=lambda r: (list(gpus).index(r.gpu.name), order.get(r.layer, len(order)), r.m))
    if torch.cuda.is_available():
        measure(rows)
    print(format_plan(rows))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(plan_json(rows), indent=1))
        print(f"\nwrote {json_path}")
    return 0
