"""The static performance model behind ``lora-lab bench --plan``: what one launch and one path of kernels should take.

For a GPU, a layer of Llama-3.1-8B, M rows of x and a kernel path of
``fused_qlora_linear``, the launches the path makes (counted from the code by
``launch_count``) each become a kernel whose body takes

    max(bytes / achievable HBM,  tensor-core FLOPs / achievable peak,  issue time of its K loop)

where a grid of P programs on S SMs streams with ``min(1, P/S)`` of the SMs,
and computes in ``ceil(P/S)`` waves of which the last may be partly empty. The
resources and the K loop's SASS come from the compile check (sm_90a for
H100/H200, sm_80 for A100); an autotuned kernel takes the compiled config the
model finds fastest, as the autotuner would. The kernels run one after
another, each after a gap: with CUDA graphs a fixed gap per kernel; without,
the host's cost of each launch, which the GPU waits for when its kernels are
shorter. Every number the model assumes is in ``ASSUMPTIONS``, with its reason.

The predicted time is then set against the least a forward must do: its
bytes at datasheet HBM bandwidth (what matters at small M) and its FLOPs at
dense bf16 peak (at large M).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from lora_lab.bench.launch_count import Launch
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


@dataclass(frozen=True)
class Assumption:
    value: float
    unit: str
    why: str


# Every number the model assumes. Estimates from public measurements, not fitted to any result of ours: a GPU run of
# `lora-lab bench --plan` prints measured times beside the predictions, and that is what should correct them.
ASSUMPTIONS = {
    "hbm_efficiency": Assumption(0.90, "of datasheet HBM", "a streaming kernel (BabelStream copy/triad, nvbandwidth) "
                                 "reaches about 90% of the datasheet bandwidth on A100 and H100"),
    "graph_gap_us": Assumption(1.0, "us before each kernel", "with CUDA graphs a kernel starts about 1 us after the "
                               "previous one ends (the grid drains, the next one's blocks are scheduled)"),
    "host_launch_us": Assumption(5.0, "us of host time per kernel", "without graphs each eager torch op or Triton "
                                 "launch costs the Python host about 5 us; the GPU waits when its kernels are shorter"),
    "wgmma_efficiency": Assumption(0.70, "of bf16 peak", "Triton's wgmma matmul (tutorial 03) reaches about 70% of "
                                   "the H100's dense peak on large bf16 squares"),
    "mma_sm90_efficiency": Assumption(0.45, "of bf16 peak", "Hopper's peak needs wgmma; mma.sync (and wgmma that ptxas "
                                      "serializes, C7515) issues at about 2/3 of its rate: 2/3 x 0.70"),
    "mma_sm80_efficiency": Assumption(0.75, "of bf16 peak", "Triton's mma.sync matmul (tutorial 03) reaches about 75% "
                                      "of the A100's 312 TFLOP/s on large bf16 squares"),
    "cublas_efficiency": Assumption(0.80, "of bf16 peak", "a large bf16 cuBLAS GEMM (a torch matmul) reaches about "
                                    "80% of dense peak on H100 and A100"),
    "issue_rate": Assumption(4.0, "warp instructions per cycle per SM", "four schedulers each issue one warp "
                             "instruction a cycle; stalls are not modelled, so the issue time is a lower bound"),
    "hbm_reads_per_operand": Assumption(1.0, "per tensor per kernel", "each tensor a kernel takes crosses HBM once "
                                        "(read or written): re-reads of a tile (x per column tile, W per row tile) "
                                        "hit L2, as grouped ordering arranges, and L2 hits cost nothing"),
    "grid_share": Assumption(1.0, "(a rule)", "a grid of P programs on S SMs streams at min(1, P/S) of the bandwidth "
                             "(an SM pulls its 1/S share, no more) and computes in ceil(P/S) waves, the last one "
                             "maybe part empty; occupancy (blocks per SM) is shown, not modelled"),
    "autotune_pick": Assumption(1.0, "(a rule)", "an autotuned kernel runs the compiled config the model predicts "
                                "fastest, of those the compile check's CI subset compiles (the default and the last "
                                "kept); on a GPU the autotuner picks from all and may differ"),
    "overlap": Assumption(1.0, "(a rule)", "a kernel's memory, tensor-core and issue times overlap perfectly (its body is "
                          "their max); launch ramp-up and tail are not modelled beyond waves of programs"),
}


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


@dataclass
class KernelTime:
    """One launch's predicted body: the memory, tensor-core and issue times, the largest of which it takes."""

    kind: str  # "triton" or "torch"
    name: str  # the compile check's name ("qlora_small_m_kernel[M=1]") or the aten op
    config: str  # the compiled config the model picked, "" for a torch op
    programs: int | None  # None: a torch op, assumed to fill the GPU
    bytes: int
    flops: int
    hbm_us: float
    tensor_us: float
    issue_us: float
    compiled: dict | None = field(default=None, repr=False)  # the compile check's result for the config

    @property
    def body_us(self) -> float:
        return max(self.hbm_us, self.tensor_us, self.issue_us)

    @property
    def bound(self) -> str:
        return max((self.hbm_us, "hbm"), (self.tensor_us, "tensor"), (self.issue_us, "issue"))[1]

    @property
    def occupancy(self) -> int | None:
        return None if self.compiled is None else self.compiled.get("blocks_per_sm")

    def to_json(self) -> dict:
        record = {k: v for k, v in asdict(self).items() if k != "compiled"}
        record.update(body_us=self.body_us, bound=self.bound)
        if self.compiled is not None:
            record.update({k: self.compiled.get(k) for k in ("registers", "threads", "shared", "mma", "serialized",
                                                             "instructions_per_weight", "integer_per_weight")})
            record["blocks_per_sm"] = self.compiled.get("blocks_per_sm")
        return record


def _value(assume: dict, name: str) -> float:
    return assume[name].value


def tensor_efficiency(compiled: dict, arch: str, assume: dict = ASSUMPTIONS) -> float:
    """The achievable fraction of bf16 peak for a compiled kernel's MMA instructions on ``arch``."""
    if compiled.get("mma") == "wgmma" and not compiled.get("serialized"):
        return _value(assume, "wgmma_efficiency")
    return _value(assume, "mma_sm80_efficiency" if arch == "sm_80" else "mma_sm90_efficiency")


def tile(config: str) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of a compiled config "128x64x64 w8 s3"."""
    m, n, k = config.split()[0].split("x")
    return int(m), int(n), int(k)


def triton_time(launch: Launch, compiled: dict, gpu: GPU, m: int, n: int, k: int,
                assume: dict = ASSUMPTIONS) -> KernelTime:
    """A Triton kernel's body with one compiled config, for a layer of (m, n, k).

    A matmul kernel (one whose SASS has MMAs) does ``2 x M_padded x N x K``
    tensor-core FLOPs, M padded to its BLOCK_M; its K loop decodes or loads each
    weight once per row tile, ``cdiv(M, BLOCK_M)`` times, and issues the SASS
    instructions per weight the compile check counted for each. A kernel with
    an MMA but no K loop over W (the small-M reduction: ``round(x @ A^T) @ B^T``,
    config MxNxR_PAD) does one MMA of its config's depth per output tile, and
    its issue time is not modelled (no loop whose instructions scale with W).
    """
    programs = launch.programs.get(compiled["config"], launch.programs.get(""))
    share = 1.0 if programs is None else min(1.0, programs / gpu.sms)
    waves = 1.0 if programs is None else programs / (math.ceil(programs / gpu.sms) * gpu.sms)
    hbm_us = 1e6 * launch.bytes / (_value(assume, "hbm_efficiency") * gpu.hbm_tbps * 1e12 * share)
    tensor_us = issue_us = 0.0
    flops = 0
    if compiled.get("mma", "none") != "none":
        block_m, _, block_k = tile(compiled["config"])
        mix, per_trip = compiled.get("loop_mix") or {}, compiled.get("weights_per_trip") or 0
        flops = 2 * math.ceil(m / block_m) * block_m * n * (k if per_trip else block_k)
        tensor_us = 1e6 * flops / (tensor_efficiency(compiled, gpu.arch, assume) * gpu.bf16_tflops * 1e12 * waves)
        if per_trip:
            lane_instructions = sum(mix.values()) * compiled["threads"] / per_trip * n * k * math.ceil(m / block_m)
            issue_rate = _value(assume, "issue_rate") * gpu.sms * gpu.clock_ghz * 1e9 * share
            issue_us = 1e6 * lane_instructions / 32 / issue_rate
    compiled = dict(compiled, blocks_per_sm=blocks_per_sm(gpu, compiled["registers"], compiled["threads"],
                                                          compiled["shared"]))
    return KernelTime("triton", compiled["kernel"], compiled["config"], programs, launch.bytes, flops,
                      hbm_us, tensor_us, issue_us, compiled)


def torch_time(launch: Launch, gpu: GPU, assume: dict = ASSUMPTIONS) -> KernelTime:
    """A torch op's body: its bytes at streaming bandwidth, its matmul FLOPs at cuBLAS's rate; it fills the GPU."""
    hbm_us = 1e6 * launch.bytes / (_value(assume, "hbm_efficiency") * gpu.hbm_tbps * 1e12)
    tensor_us = 1e6 * launch.flops / (_value(assume, "cublas_efficiency") * gpu.bf16_tflops * 1e12)
    return KernelTime("torch", f"aten.{launch.name}", "", None, launch.bytes, launch.flops, hbm_us, tensor_us, 0.0)


def compiled_variant(launch: Launch, compiled: list[dict], arch: str) -> list[dict]:
    """The compile check's results for this launch on ``arch`` (bf16, r = 16): every config compiled.

    The compile check names a kernel's variants as its launches differ: ``[M=1]``/``[M=16]``
    for the small-M kernel and its reduction, M = 1 being a specialization of
    its own. A kernel it does not compile has no results.
    """
    mine = [c for c in compiled if c["arch"] == arch and c.get("rank", RANK) == RANK
            and c.get("dtype", "bfloat16") == "bfloat16" and c["kernel"].split("[")[0] == launch.name]
    names = {c["kernel"] for c in mine}
    wanted = launch.name
    if f"{launch.name}[M=1]" in names:
        wanted = f"{launch.name}[M={1 if launch.arguments.get('M') == 1 else 16}]"
    return [c for c in mine if c["kernel"] == wanted]


def kernel_time(launch: Launch, compiled: list[dict], gpu: GPU, m: int, n: int, k: int,
                assume: dict = ASSUMPTIONS) -> KernelTime:
    """The body of one launch; an autotuned kernel takes its fastest compiled config, as the autotuner would."""
    if launch.kind == "torch":
        return torch_time(launch, gpu, assume)
    candidates = compiled_variant(launch, compiled, gpu.arch)
    if not candidates:  # a kernel the compile check does not compile: only its bytes and grid are known
        programs = launch.programs.get("") or max(launch.programs.values(), default=None)
        share = 1.0 if programs is None else min(1.0, programs / gpu.sms)
        hbm_us = 1e6 * launch.bytes / (_value(assume, "hbm_efficiency") * gpu.hbm_tbps * 1e12 * share)
        return KernelTime("triton", launch.name + " (not compiled)", "", programs, launch.bytes, 0, hbm_us, 0.0, 0.0)
    return min((triton_time(launch, c, gpu, m, n, k, assume) for c in candidates), key=lambda t: t.body_us)


def graph_time(kernels: list[KernelTime], assume: dict = ASSUMPTIONS) -> float:
    """With CUDA graphs: every kernel after a fixed gap, one after another."""
    return sum(_value(assume, "graph_gap_us") + t.body_us for t in kernels)


def eager_time(kernels: list[KernelTime], assume: dict = ASSUMPTIONS) -> float:
    """Without graphs: the host launches each kernel ``host_launch_us`` after the last; a kernel starts when both its
    launch and the previous kernel (plus the gap) are done."""
    host = gpu_free = 0.0
    for t in kernels:
        host += _value(assume, "host_launch_us")
        gpu_free = max(host, gpu_free + _value(assume, "graph_gap_us")) + t.body_us
    return gpu_free


@dataclass
class Row:
    """One (GPU, layer, M, path): the launches the path makes, their predicted bodies, and the path's time."""

    layer: str
    m: int
    n: int
    k: int
    gpu: GPU
    path: str
    auto: bool  # the path fused_qlora_linear takes at this M
    kernels: list[KernelTime]
    assume: dict = field(default_factory=lambda: ASSUMPTIONS, repr=False)
    measured_us: float | None = None

    @property
    def predicted_us(self) -> float:
        return graph_time(self.kernels, self.assume)

    @property
    def eager_us(self) -> float:
        return eager_time(self.kernels, self.assume)

    @property
    def hbm_fraction(self) -> float:
        """The layer's least bytes over datasheet HBM bandwidth, as a fraction of the predicted time."""
        return 1e6 * layer_bytes(self.m, self.n, self.k) / (self.gpu.hbm_tbps * 1e12) / self.predicted_us

    @property
    def peak_fraction(self) -> float:
        """The layer's FLOPs at dense bf16 peak, as a fraction of the predicted time."""
        return 1e6 * layer_flops(self.m, self.n, self.k) / (self.gpu.bf16_tflops * 1e12) / self.predicted_us

    @property
    def bound(self) -> str:
        """What most of the predicted time goes to: the gaps between launches, or one kind of kernel body."""
        spent = {"launches": len(self.kernels) * _value(self.assume, "graph_gap_us")}
        for t in self.kernels:
            spent[t.bound] = spent.get(t.bound, 0.0) + t.body_us
        return max(spent, key=spent.get)

    @property
    def main(self) -> KernelTime:
        return max(self.kernels, key=lambda t: t.body_us)

    def to_json(self) -> dict:
        return {
            "gpu": self.gpu.name, "gpu_spec": asdict(self.gpu), "layer": self.layer, "m": self.m, "n": self.n,
            "k": self.k, "rank": RANK, "dtype": "bfloat16", "path": self.path, "auto": self.auto,
            "launches": len(self.kernels), "triton_launches": sum(t.kind == "triton" for t in self.kernels),
            "least_bytes": layer_bytes(self.m, self.n, self.k), "flops": layer_flops(self.m, self.n, self.k),
            "bytes_moved": sum(t.bytes for t in self.kernels), "kernels": [t.to_json() for t in self.kernels],
            "predicted_us": self.predicted_us, "predicted_eager_us": self.eager_us, "bound": self.bound,
            "hbm_fraction": self.hbm_fraction, "peak_fraction": self.peak_fraction, "measured_us": self.measured_us,
        }


def plan_rows(compiled: list[dict], counted: dict, gpus=tuple(GPUS), assume: dict = ASSUMPTIONS) -> list[Row]:
    """One row per (GPU, layer, M, path) that ``counted`` (``launch_count``'s output) has launches for."""
    layers = {(n, k): name for name, n, k in llama_layers()}
    rows = []
    for gpu_name in gpus:
        gpu = GPUS[gpu_name]
        for entry in counted["paths"]:
            m, n, k, path = entry["m"], entry["n"], entry["k"], entry["path"]
            launches = [Launch(**launch) for launch in entry["launches"]]
            kernels = [kernel_time(launch, compiled, gpu, m, n, k, assume) for launch in launches]
            rows.append(Row(layers.get((n, k), f"{n}x{k}"), m, n, k, gpu, path, entry["auto"], kernels, assume))
    return rows
