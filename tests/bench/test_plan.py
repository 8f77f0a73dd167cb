"""``lora-lab bench --plan``'s static performance model (plan_model.py, plan.py): its arithmetic, on hand-worked numbers.

The compiled resources come from the compile check (tests/triton_kernels/test_compile_check.py runs it) and the
launches from ``launch_count``; here both are given, so the model's own arithmetic is what is tested. The launch
counter is tested on a toy function, and on the real op only for what any path must do, not for today's counts.
"""

from __future__ import annotations

import json

import lora_lab.kernels  # noqa: F401  (sets TRITON_INTERPRET before triton is imported, when there is no GPU)
import pytest
import torch
import triton
import triton.language as tl

from lora_lab.bench import launch_count, plan
from lora_lab.bench.launch_count import Launch, count_launches
from lora_lab.bench.plan import format_plan, plan_json
from lora_lab.bench.plan_model import (
    ASSUMPTIONS,
    GPUS,
    KernelTime,
    blocks_per_sm,
    compiled_variant,
    eager_time,
    graph_time,
    kernel_time,
    layer_bytes,
    layer_flops,
    llama_layers,
    plan_rows,
)
from lora_lab.cli import main

H100 = GPUS["H100"]
HBM = ASSUMPTIONS["hbm_efficiency"].value
GAP = ASSUMPTIONS["graph_gap_us"].value


def compiled(kernel: str, arch: str, config: str, registers: int, threads: int, shared: int, mix: dict, weights: int,
             mma: str = "wgmma"):
    return {"kernel": kernel, "arch": arch, "config": config, "registers": registers, "threads": threads, "shared": shared,
            "loop_mix": mix, "weights_per_trip": weights, "mma": mma, "serialized": False, "rank": 16, "dtype": "bfloat16"}


MIX = {"integer": 32, "mma": 4, "memory": 28}  # 64 warp instructions per K-loop trip


def fake_compile_check() -> list[dict]:
    """Per target: the fused kernel in two configs, the small-M kernel and its reduction (16 x 32 output tiles, one
    16 x 32 x 16 MMA each, no K loop) at M = 1 and M = 16, and the dequantize kernel."""
    results = []
    for arch in ("sm_90a", "sm_80"):
        mma = "wgmma" if arch == "sm_90a" else "mma"
        results += [
            compiled("qlora_forward_kernel", arch, "64x128x64 w8 s4", 128, 256, 73 * 1024, MIX, 128 * 64, mma),
            compiled("qlora_forward_kernel", arch, "16x64x64 w4 s3", 96, 128, 20 * 1024, MIX, 64 * 64, mma),
            compiled("qlora_small_m_kernel[M=1]", arch, "16x64x64 w4 s3", 72, 128, 28 * 1024, MIX, 64 * 64, "mma"),
            compiled("qlora_small_m_kernel[M=16]", arch, "16x64x64 w4 s3", 72, 128, 28 * 1024, MIX, 64 * 64, "mma"),
            compiled("qlora_small_m_reduce_kernel[M=1]", arch, "16x32x16 w4 s3", 32, 128, 2048, None, 0, "mma"),
            compiled("qlora_small_m_reduce_kernel[M=16]", arch, "16x32x16 w4 s3", 40, 128, 2048, None, 0, "mma"),
            compiled("nf4_dequantize_kernel", arch, "-", 30, 128, 0, None, 0, "none"),
        ]
    return results


def triton_launch(name: str, nbytes: int, programs: dict, **arguments) -> Launch:
    return Launch("triton", name, nbytes, 0, programs, arguments)


def test_bytes_and_flops_of_a_layer():
    """4096 x 4096 at M = 1: 8 MiB of codes, 256 KiB of absmax, x and y, A and B (r = 16) in bf16."""
    assert layer_bytes(1, 4096, 4096) == 4096 * 4096 // 2 + 4096 * 4096 // 64 + 2 * (4096 + 4096) + 2 * 16 * 8192
    assert layer_flops(1, 4096, 4096) == 2 * 4096 * 4096 + 2 * 16 * 8192


def test_llama_layer_shapes_come_from_the_preset():
    assert llama_layers() == [("q_proj/o_proj", 4096, 4096), ("k_proj/v_proj", 1024, 4096),
                              ("gate/up_proj", 14336, 4096), ("down_proj", 4096, 14336)]


@pytest.mark.parametrize(("registers", "threads", "shared", "expected"), [
    (128, 256, 73 * 1024, 2),  # registers: 65536 / (128 x 256) = 2; shared: 228 / 73 = 3
    (72, 128, 28 * 1024, 7),  # registers: 72 -> 2304 per warp, 65536 / (4 x 2304) = 7; shared: 228 / 28 = 8
    (255, 256, 1024, 1),  # 255 -> 8192 per warp, 8 warps: 65536 / 65536 = 1
    (32, 64, 0, 32),  # only the 32-block limit binds
])
def test_blocks_per_sm_from_registers_and_shared_memory(registers, threads, shared, expected):
    assert blocks_per_sm(GPUS["H100"], registers, threads, shared) == expected


def test_a_grid_smaller_than_the_sms_streams_with_only_that_share():
    """0.9 x 3.35 TB/s moves 3.015 MB in 1 us with every SM; 66 programs on 132 SMs take 2 us."""
    dequantize = [c for c in fake_compile_check() if c["kernel"] == "nf4_dequantize_kernel"]
    full = kernel_time(triton_launch("nf4_dequantize_kernel", 3_015_000, {"": 264}), dequantize, H100, 1, 1, 1)
    half = kernel_time(triton_launch("nf4_dequantize_kernel", 3_015_000, {"": 66}), dequantize, H100, 1, 1, 1)
    assert full.hbm_us == pytest.approx(1.0) and full.tensor_us == full.issue_us == 0 and full.bound == "hbm"
    assert half.hbm_us == pytest.approx(2.0) and half.body_us == pytest.approx(2.0)


def test_tensor_time_counts_padded_rows_and_the_last_wave():
    """M = 100 pads to 128 rows; 198 programs on 132 SMs run in 2 waves, 198 / 264 = 3/4 of them busy."""
    forward = [c for c in fake_compile_check() if c["kernel"] == "qlora_forward_kernel" and c["arch"] == "sm_90a"][:1]
    t = kernel_time(triton_launch("qlora_forward_kernel", 0, {"64x128x64 w8 s4": 198}), forward, H100, 100, 4096, 4096)
    flops = 2 * 128 * 4096 * 4096
    assert t.flops == flops
    assert t.tensor_us == pytest.approx(1e6 * flops / (ASSUMPTIONS["wgmma_efficiency"].value * 989e12 * 0.75))


def test_issue_time_from_the_compiled_k_loop():
    """64 warp instructions per trip of 128 threads over 64 x 64 weights: 2 lane instructions per weight decoded."""
    small = [c for c in fake_compile_check() if c["kernel"] == "qlora_small_m_kernel[M=1]" and c["arch"] == "sm_90a"]
    t = kernel_time(triton_launch("qlora_small_m_kernel", 0, {"": 264}, M=1), small, H100, 1, 4096, 4096)
    per_weight = 64 * 128 / (64 * 64)
    assert t.issue_us == pytest.approx(1e6 * per_weight * 4096 * 4096 / 32 / (4 * 132 * 1.98e9))
    assert t.config == "16x64x64 w4 s3" and t.body_us == max(t.hbm_us, t.tensor_us, t.issue_us)


def test_an_autotuned_kernel_takes_its_fastest_compiled_config():
    """At M = 16 the 16-row tile decodes W once; the 64-row tile has 4x the rows to multiply and 8 programs, not 64."""
    forward = [c for c in fake_compile_check() if c["kernel"] == "qlora_forward_kernel" and c["arch"] == "sm_90a"]
    launch = triton_launch("qlora_forward_kernel", 10**7, {"64x128x64 w8 s4": 8, "16x64x64 w4 s3": 64})
    t = kernel_time(launch, forward, H100, 16, 1024, 4096)
    assert t.config == "16x64x64 w4 s3" and t.programs == 64
    assert t.body_us == min(kernel_time(launch, [c], H100, 16, 1024, 4096).body_us for c in forward)


def test_the_compile_checks_variant_names():
    """M = 1 is a specialization of its own for the small-M kernel and its reduction; any other M reads M = 16's."""
    results = fake_compile_check()
    found = [compiled_variant(triton_launch(name, 0, {}, M=m), results, "sm_80")
             for name in ("qlora_forward_kernel", "qlora_small_m_kernel", "qlora_small_m_reduce_kernel") for m in (1, 9)]
    assert [[c["kernel"] for c in variant] for variant in found] == [
        ["qlora_forward_kernel"] * 2, ["qlora_forward_kernel"] * 2,
        ["qlora_small_m_kernel[M=1]"], ["qlora_small_m_kernel[M=16]"],
        ["qlora_small_m_reduce_kernel[M=1]"], ["qlora_small_m_reduce_kernel[M=16]"]]


def test_the_reduction_is_timed_from_its_compiled_kernel():
    """No K loop over W: one 16 x 32 x 16 MMA per output tile (2 x 16 x N x 16 FLOPs in all, not 2 x 16 x N x K),
    no issue time, and its bytes streamed by the share of the SMs its N / 32 programs occupy."""
    launch = triton_launch("qlora_small_m_reduce_kernel", 3_015_000, {"": 66}, M=16)
    t = kernel_time(launch, fake_compile_check(), H100, 16, 2112, 4096)
    assert t.name == "qlora_small_m_reduce_kernel[M=16]" and t.config == "16x32x16 w4 s3" and t.occupancy
    assert t.flops == 2 * 16 * 2112 * 16 and t.issue_us == 0.0
    assert t.hbm_us == pytest.approx(2.0) and t.bound == "hbm"


def test_a_kernel_the_compile_check_lacks_is_timed_by_its_bytes_and_says_so():
    t = kernel_time(triton_launch("new_decode_kernel", 3_015_000, {"": 132}), fake_compile_check(), H100, 1, 1, 1)
    assert t.name == "new_decode_kernel (not compiled)" and t.hbm_us == pytest.approx(1.0) and t.issue_us == 0


def test_a_torch_op_streams_its_bytes_or_runs_at_cublas_rate():
    mm = kernel_time(Launch("torch", "mm", 3_015_000, 10**12), [], H100, 1, 1, 1)
    assert mm.name == "aten.mm" and mm.programs is None
    assert mm.hbm_us == pytest.approx(1.0)
    assert mm.tensor_us == pytest.approx(1e6 / (ASSUMPTIONS["cublas_efficiency"].value * 989))


def body(us: float) -> KernelTime:
    return KernelTime("torch", "aten.add", "", None, 0, 0, us, 0.0, 0.0)


def test_with_graphs_every_kernel_waits_one_gap():
    assert graph_time([body(10), body(1), body(1)]) == pytest.approx(12 + 3 * GAP)


@pytest.mark.parametrize(("bodies", "expected"), [
    ((10, 1, 1), 19.0),  # host launches at 5, 10, 15: kernel 1 runs 5-15, 2 waits its gap 16-17, 3 runs 18-19
    ((1, 1, 1), 16.0),  # the GPU waits on the host: kernels at 5-6, 10-11, 15-16
])
def test_without_graphs_the_gpu_waits_on_the_host(bodies, expected):
    assert ASSUMPTIONS["host_launch_us"].value == 5.0 and GAP == 1.0  # the hand-worked numbers assume these
    assert eager_time([body(us) for us in bodies]) == pytest.approx(expected)


def fake_counted() -> dict:
    """q_proj at M = 1 on three paths: small-M (two kernels), fused (x @ A^T + one kernel), dense (four kernels)."""
    n = k = 4096
    nf4, dense = n * k // 2 + n * k // 64, 2 * n * k
    return {"paths": [
        {"m": 1, "n": n, "k": k, "path": "small_m", "auto": True, "launches": [
            vars(triton_launch("qlora_small_m_kernel", nf4, {"": 264}, M=1)),
            vars(triton_launch("qlora_small_m_reduce_kernel", 10**5, {"": 32}, M=1))]},
        {"m": 1, "n": n, "k": k, "path": "fused", "auto": False, "launches": [
            vars(Launch("torch", "mm", 2 * 16 * k, 2 * 16 * k)),
            vars(triton_launch("qlora_forward_kernel", nf4, {"64x128x64 w8 s4": 32, "16x64x64 w4 s3": 64}))]},
        {"m": 1, "n": n, "k": k, "path": "dense", "auto": False, "launches": [
            vars(triton_launch("nf4_dequantize_kernel", nf4 + dense, {"": 4096})),
            vars(Launch("torch", "mm", dense + 2 * (k + n), 2 * n * k))]},
    ]}


def test_a_row_per_gpu_layer_m_and_path_with_its_fractions():
    rows = plan_rows(fake_compile_check(), fake_counted())
    assert len(rows) == len(GPUS) * 3
    small = next(r for r in rows if r.gpu.name == "H100" and r.path == "small_m")
    assert small.auto and [t.name for t in small.kernels] == ["qlora_small_m_kernel[M=1]",
                                                              "qlora_small_m_reduce_kernel[M=1]"]
    assert small.predicted_us == pytest.approx(sum(t.body_us for t in small.kernels) + 2 * GAP)
    assert small.hbm_fraction == pytest.approx(1e6 * layer_bytes(1, 4096, 4096) / 3.35e12 / small.predicted_us)
    assert small.peak_fraction == pytest.approx(1e6 * layer_flops(1, 4096, 4096) / 989e12 / small.predicted_us)
    dense = next(r for r in rows if r.gpu.name == "H100" and r.path == "dense")
    assert dense.predicted_us > small.predicted_us and dense.bound == "hbm"


def test_the_table_and_the_json():
    rows = plan_rows(fake_compile_check(), fake_counted())
    table = format_plan(rows)
    for gpu in GPUS.values():
        assert f"{gpu.name}: {gpu.hbm_tbps} TB/s" in table
    assert table.count("small_m*") == len(GPUS) and table.count(" fused ") == len(GPUS)
    for name, assumption in ASSUMPTIONS.items():
        assert f"{name} = {assumption.value:g}" in table and assumption.why in table
    document = json.loads(json.dumps(plan_json(rows)))
    assert set(document["assumptions"]) == set(ASSUMPTIONS)
    assert [(r["gpu"], r["path"]) for r in document["records"]] == [(r.gpu.name, r.path) for r in rows]
    record = document["records"][0]
    assert record["predicted_us"] == pytest.approx(rows[0].predicted_us) and len(record["kernels"]) == 2
    assert record["kernels"][0]["registers"] == 72 and record["kernels"][0]["bound"] == rows[0].kernels[0].bound
    rows[0].measured_us = 2 * rows[0].predicted_us  # on a GPU: the measured time beside the prediction
    measured = [line for line in format_plan(rows).splitlines()
                if line.startswith("layer") and "measured" in line or line.endswith(" 2.00")]
    assert len(measured) == 2 and measured[0].split()[-2:] == ["measured", "/pred"]


@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) + 1, mask=offsets < n)


_add_one_tuned = triton.autotune([triton.Config({"BLOCK": 32}), triton.Config({"BLOCK": 64})], key=["n"])(_add_one)


def test_the_counter_sees_kernels_not_views_or_allocations_and_runs_no_triton_kernel():
    x, w, target = torch.ones(40, 4), torch.ones(4, 3), torch.zeros(120)
    cache = []

    def toy():
        if not cache:
            cache.append(torch.zeros(3))  # a first call's cache fill: not counted
        y = x @ w  # aten.mm: a kernel
        y.t()  # a view: none
        torch.empty(5)  # an allocation: none
        y + 1  # aten.add: a kernel
        _add_one[(15,)](target, 120, BLOCK=8)  # recorded, not run
        _add_one_tuned[lambda meta: (triton.cdiv(120, meta["BLOCK"]),)](target, 120)

    launches = count_launches(toy)
    assert [(launch.kind, launch.name) for launch in launches] == [
        ("torch", "mm"), ("torch", "add"), ("triton", "_add_one"), ("triton", "_add_one")]
    mm, add, fixed, tuned = launches
    assert mm.bytes == 4 * (40 * 4 + 4 * 3 + 40 * 3) and mm.flops == 2 * 40 * 4 * 3
    assert add.bytes == 4 * (40 * 3 + 40 * 3) and add.flops == 0
    assert fixed.programs == {"": 15} and fixed.arguments["n"] == 120 and fixed.bytes == 4 * 120
    assert sorted(tuned.programs.values()) == [2, 4]  # cdiv(120, 64) and cdiv(120, 32), one per config
    assert torch.equal(target, torch.zeros(120))  # neither kernel ran...
    _add_one[(15,)](target, 120, BLOCK=8)
    assert torch.equal(target, torch.ones(120))  # ...though run for real, it writes the target


def test_the_real_op_counts_on_meta_tensors_and_its_dense_path_moves_w_dense():
    """Whatever each path launches today: at least one Triton kernel, and the dense path writes and reads W dense."""
    entries = launch_count.path_launches(1, 256, 128)
    assert sum(e["auto"] for e in entries) == 1 and {"fused", "dense"} <= {e["path"] for e in entries}
    for entry in entries:
        assert any(launch["kind"] == "triton" for launch in entry["launches"]), entry["path"]
    dense = next(e for e in entries if e["path"] == "dense")
    nf4 = 256 * 128 // 2
    assert sum(launch["bytes"] for launch in dense["launches"]) >= nf4 + 2 * (2 * 256 * 128)


def test_the_small_m_rows_count_the_split_the_launcher_picks_for_their_m():
    """The small-M kernel's grid is the launcher's own, which splits K by M (split_k_for(..., m)): at M = 16 its
    workspace costs 16 times M = 1's a slice, so a 4096 x 4096 layer gets fewer slices than at M = 1. The model reads
    the grid the real launcher passes (on meta tensors), so its M = 16 rows have M = 16's split."""
    from lora_lab.kernels.qlora_small_m import small_m_grid

    grids = {}
    for m in (1, 16):
        small = next(e for e in launch_count.path_launches(m, 4096, 4096) if e["path"] == "small_m")
        kernel, reduce = small["launches"]
        assert (kernel["name"], reduce["name"]) == ("qlora_small_m_kernel", "qlora_small_m_reduce_kernel")
        grids[m] = small_m_grid(m, 4096, 4096, 64)
        assert kernel["programs"] == {"": grids[m][0] * grids[m][1]} and kernel["arguments"]["M"] == m
        assert reduce["arguments"]["SPLIT_K"] == grids[m][1]
    assert grids[16][1] < grids[1][1]


def test_plan_refuses_an_unwritable_json_before_any_work(tmp_path, capsys):
    assert main(["bench", "--plan", "--json", str(tmp_path)]) == 2
    assert "--json" in capsys.readouterr().err


def test_plan_prints_the_tables_and_writes_the_json(tmp_path, monkeypatch, capsys):
    """The command end to end, its two children's outputs given: a table per GPU, then the file."""
    monkeypatch.setattr(plan, "compiled_and_counted", lambda shapes: (fake_compile_check(), fake_counted()))
    path = tmp_path / "plans" / "plan.json"
    assert main(["bench", "--plan", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if "TB/s HBM" in line] == list(GPUS)
    document = json.loads(path.read_text())
    assert len(document["records"]) == 3 * len(GPUS) and f"wrote {path}" in out
