"""``lora-lab bench --plan``: a static performance model of the QLoRA forward on Llama-3.1-8B layers, on any machine.

Why
---
A benchmark needs a GPU; a model does not, and says what a benchmark should
find. For each layer shape and M (rows of x: 1 and 16 while generating, 128
and 4096 for prefill and training) the table gives:

- *bytes and FLOPs* of ``y = x @ W^T + scaling * (x @ A^T) @ B^T`` with W in NF4
  (half a byte per weight plus one uint8 absmax per block, double quantization):
  the least any kernel must move and compute;
- *ideal time* on a named GPU: ``max(bytes / HBM bandwidth, FLOPs / dense bf16 peak)``;
- the *kernel path* ``fused_qlora_linear`` takes at that M, its *programs*
  against the GPU's SMs (a grid smaller than the SMs leaves bandwidth unused),
  and the *occupancy* (blocks per SM) that its compiled registers and shared
  memory allow;
- the *K loop's instruction mix* from the compiled SASS: instructions per
  decoded weight, and the *issue time*: every K-loop instruction of every
  program issued at 4 warp-instructions per cycle per SM. A decode that costs
  more issue time than the bytes take to arrive makes the kernel issue-bound.

The resources and SASS come from ``lora_lab.kernels.compile.compile_check`` (sm_90a for
H100/H200, sm_80 for A100), compiled here without a GPU. On a GPU, ``--plan``
also times the layer forward (CUDA events, L2 flushed between runs) and adds the
measured time and its fraction of ideal.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

from lora_lab.model import PRESETS


@dataclass(frozen=True)
class GPU:
    """The numbers the model needs; dense bf16 tensor-core peak without sparsity."""

    name: str
    arch: str  # the compile target
    hbm_tbps: float
    bf16_tflops: float
    sms: int
    clock_ghz: float  # boost clock, for the issue-rate estimate
    smem_per_sm_kib: int  # shared memory per SM available to blocks
    registers_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32


GPUS = {
    "H200": GPU("H200", "sm_90a", 4.8, 989.0, 132, 1.98, 228),
    "H100": GPU("H100", "sm_90a", 3.35, 989.0, 132, 1.98, 228),
    "A100": GPU("A100", "sm_80", 2.039, 312.0, 108, 1.41, 164),
}
TOKENS = (1, 16, 128, 4096)
RANK = 16


def llama_layers() -> list[tuple[str, int, int]]:
    """(name, N, K) of Llama-3.1-8B's decoder linears, from the project's preset."""
    p = PRESETS["llama-3.1-8b"]
    head_dim = p.hidden // p.heads
    return [("q_proj/o_proj", p.hidden, p.hidden), ("k_proj/v_proj", p.kv_heads * head_dim, p.hidden),
            ("gate/up_proj", p.intermediate, p.hidden), ("down_proj", p.hidden, p.intermediate)]


def layer_bytes(m: int, n: int, k: int, r: int = RANK, blocksize: int = 64) -> int:
    """Bytes a forward must move at least: NF4 W (codes + uint8 absmax), x and y in bf16, A and B in bf16."""
    return n * k // 2 + n * k // blocksize + 2 * (m * k + m * n) + 2 * r * (k + n)


def layer_flops(m: int, n: int, k: int, r: int = RANK) -> int:
    return 2 * m * n * k + 2 * m * r * (k + n)


def blocks_per_sm(gpu: GPU, registers: int, threads: int, shared: int) -> int:
    """Resident blocks per SM allowed by registers (allocated per warp in units of 256), shared memory and threads."""
    warps = threads // 32
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_registers = gpu.registers_per_sm // (per_warp * warps)
    by_shared = (gpu.smem_per_sm_kib * 1024) // shared if shared else gpu.max_blocks_per_sm
    return max(0, min(by_registers, by_shared, gpu.max_threads_per_sm // threads, gpu.max_blocks_per_sm))


def compiled_kernels() -> list[dict]:
    """The compile check's CI subset with SASS, run in a child that compiles (this process may be interpreting)."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "compiled.json")
        env = dict(os.environ, TRITON_INTERPRET="0", LORA_LAB_COMPILE_ONLY="1", LORA_LAB_AUTOTUNE="1")
        if torch.cuda.is_available():
            env.pop("LORA_LAB_COMPILE_ONLY")
        done = subprocess.run([sys.executable, "-m", "lora_lab.kernels.compile.compile_check", "--subset", "ci", "--sass",
                               "--json", out], capture_output=True, text=True, env=env)
        if not os.path.exists(out):
            raise RuntimeError(f"the compile check failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


@dataclass
class Row:
    layer: str
    m: int
    n: int
    k: int
    gpu: GPU
    path: str
    kernel: dict  # the compile check's result for the kernel this path launches
    programs: int
    measured_us: float | None = None

    @property
    def ideal_us(self) -> float:
        return 1e6 * max(layer_bytes(self.m, self.n, self.k) / (self.gpu.hbm_tbps * 1e12),
                         layer_flops(self.m, self.n, self.k) / (self.gpu.bf16_tflops * 1e12))

    @property
    def occupancy(self) -> int:
        return blocks_per_sm(self.gpu, self.kernel["registers"], self.kernel["threads"], self.kernel["shared"])

    def per_weight(self, *kinds: str) -> float:
        mix, weights = self.kernel.get("loop_mix") or {}, self.kernel.get("weights_per_trip") or 0
        count = sum(mix.get(k, 0) for k in kinds) if kinds else sum(mix.values())
        return count * self.kernel["threads"] / weights if weights else float("nan")

    @property
    def issue_us(self) -> float:
        """Time to issue every K-loop instruction: per-weight instructions x weights decoded x times each is decoded."""
        decodes = self.n * self.k * (1 if self.path == "small_m" else math.ceil(self.m / self.block_m))
        lane_instructions = self.per_weight() * decodes
        return 1e6 * lane_instructions / 32 / (4 * self.gpu.sms * self.gpu.clock_ghz * 1e9)

    @property
    def block_m(self) -> int:
        return int(self.kernel["config"].split("x")[0])

    @property
    def mma_share(self) -> float:
        mix = self.kernel.get("loop_mix") or {}
        return mix.get("mma", 0) / max(sum(mix.values()), 1)


def plan_rows(compiled: list[dict], gpus=tuple(GPUS), tokens=TOKENS) -> list[Row]:
    """One row per (GPU, layer, M): the path ``fused_qlora_linear`` takes and the compiled kernel behind it."""
    from lora_lab.kernels.fused_qlora_linear import DENSE_FROM_M, SMALL_M
    from lora_lab.kernels.qlora_small_m import GPU_TILE, split_k_for

    def kernel(name: str, arch: str) -> dict:
        found = [c for c in compiled if c["kernel"] == name and c["arch"] == arch]
        if not found:
            raise RuntimeError(f"the compile check has no {name} for {arch}")
        return found[0]  # the first listed is the default config (the first the pruning keeps)

    rows = []
    for gpu_name in gpus:
        gpu = GPUS[gpu_name]
        for layer, n, k in llama_layers():
            for m in tokens:
                path = "small_m" if m <= SMALL_M else ("dense" if m >= DENSE_FROM_M else "fused")
                if path == "small_m":
                    info = kernel(f"qlora_small_m_kernel[M={1 if m == 1 else 16}]", gpu.arch)
                    programs = math.ceil(n / GPU_TILE[0]) * split_k_for(n, k // GPU_TILE[1], GPU_TILE[0])
                else:
                    info = kernel("qlora_forward_kernel" + ("[dense]" if path == "dense" else ""), gpu.arch)
                    block_m, block_n = (int(v) for v in info["config"].split()[0].split("x")[:2])
                    programs = math.ceil(m / block_m) * math.ceil(n / block_n)
                rows.append(Row(layer, m, n, k, gpu, path, info, programs))
    return rows


def measure(rows: list[Row]) -> None:
    """On a GPU: the median forward time of fused_qlora_linear for each row's shape (bf16, r=16, blocksize 64, dq)."""
    import triton

    from lora_lab.kernels import fused_qlora_linear
    from lora_lab.nf4 import quantize_nf4

    here = torch.cuda.get_device_name()
    weights = {}
    for row in rows:
        if row.gpu.name not in here:  # only this GPU's rows can be measured
            continue
        if (row.n, row.k) not in weights:
            weights.clear()
            weights[(row.n, row.k)] = quantize_nf4(torch.randn(row.n, row.k, device="cuda") * 0.02, 64, True)
        args = (torch.randn(row.m, row.k, device="cuda", dtype=torch.bfloat16), weights[(row.n, row.k)],
                torch.randn(RANK, row.k, device="cuda", dtype=torch.bfloat16) / 64,
                torch.randn(row.n, RANK, device="cuda", dtype=torch.bfloat16), 2.0)
        with torch.no_grad():
            row.measured_us = 1e3 * triton.testing.do_bench(lambda args=args: fused_qlora_linear(*args))


def format_plan(rows: list[Row]) -> str:
    lines = []
    for gpu_name in dict.fromkeys(r.gpu.name for r in rows):
        gpu = GPUS[gpu_name]
        lines.append(f"\n{gpu.name}: {gpu.hbm_tbps} TB/s, {gpu.bf16_tflops:g} TFLOP/s dense bf16, {gpu.sms} SMs ({gpu.arch})")
        measured = any(r.measured_us for r in rows if r.gpu.name == gpu_name)
        lines.append(f"{'layer':<14} {'M':>5} {'N x K':>12} {'MB':>7} {'GFLOP':>7} {'ideal us':>9} {'path':<8} "
                     f"{'tile':<16} {'progs':>6} {'/SMs':>5} {'blk/SM':>6} {'regs':>4} {'int/w':>6} {'ins/w':>6} "
                     f"{'mma%':>5} {'issue us':>9}" + (f" {'measured':>9} {'of ideal':>8}" if measured else ""))
        for r in (row for row in rows if row.gpu.name == gpu_name):
            line = (f"{r.layer:<14} {r.m:>5} {f'{r.n}x{r.k}':>12} {layer_bytes(r.m, r.n, r.k) / 1e6:>7.1f} "
                    f"{layer_flops(r.m, r.n, r.k) / 1e9:>7.2f} {r.ideal_us:>9.1f} {r.path:<8} {r.kernel['config']:<16} "
                    f"{r.programs:>6} {r.programs / r.gpu.sms:>5.1f} {r.occupancy:>6} {r.kernel['registers']:>4} "
                    f"{r.per_weight('integer'):>6.2f} {r.per_weight():>6.2f} {100 * r.mma_share:>5.1f} {r.issue_us:>9.1f}")
            if r.measured_us:
                line += f" {r.measured_us:>9.1f} {r.ideal_us / r.measured_us:>8.0%}"
            lines.append(line)
    lines.append(
        "\nMB, GFLOP: the least a forward moves and computes (bf16 x/y/A/B, NF4 W with uint8 absmax; r=16). ideal: "
        "max(bytes/HBM, FLOPs/peak). path: fused_qlora_linear's kernel at that M; tile, regs, blk/SM (resident blocks per SM "
        "from registers and shared memory): the compiled default config. int/w, ins/w: integer and all SASS instructions "
        "of the K loop per decoded weight (per thread); issue us: the time to issue them all at 4 warp-instructions per "
        "cycle per SM. The dense path's W costs one nf4_dequantize pass more, not counted in its row."
    )
    return "\n".join(lines)


def run_plan(gpus=tuple(GPUS), tokens=TOKENS) -> int:
    """Print the model (and on a GPU, the measured times); 0 on success."""
    rows = plan_rows(compiled_kernels(), gpus, tokens)
    if torch.cuda.is_available():
        measure(rows)
    print(format_plan(rows))
    return 0
