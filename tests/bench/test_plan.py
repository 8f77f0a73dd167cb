"""The static performance model of ``lora-lab bench --plan``: its arithmetic, on numbers worked out by hand.

The compiled resources come from the compile check (tests/triton_kernels/test_compile_check.py runs it);
here they are given, so the model's own arithmetic is what is tested.
"""

from __future__ import annotations

import pytest

from lora_lab.bench.plan import GPUS, blocks_per_sm, format_plan, layer_bytes, layer_flops, llama_layers, plan_rows


def compiled(kernel: str, arch: str, config: str, registers: int, threads: int, shared: int, mix: dict, weights: int):
    return {"kernel": kernel, "arch": arch, "config": config, "registers": registers, "threads": threads, "shared": shared,
            "loop_mix": mix, "weights_per_trip": weights}


def fake_compile_check() -> list[dict]:
    """One result per kernel the plan reads, per target: 64 instructions per trip, 32 of them integer."""
    mix = {"integer": 32, "mma": 4, "memory": 28}
    results = []
    for arch in ("sm_90a", "sm_80"):
        results += [
            compiled("qlora_forward_kernel", arch, "64x128x64 w8 s4", 128, 256, 73 * 1024, mix, 128 * 64),
            compiled("qlora_forward_kernel[dense]", arch, "128x128x64 w8 s3", 160, 256, 100 * 1024, mix, 128 * 64),
            compiled("qlora_small_m_kernel[M=1]", arch, "16x64x64 w4 s3", 72, 128, 28 * 1024, mix, 64 * 64),
            compiled("qlora_small_m_kernel[M=16]", arch, "16x64x64 w4 s3", 72, 128, 28 * 1024, mix, 64 * 64),
        ]
    return results


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


def test_each_m_takes_the_path_fused_qlora_linear_takes():
    rows = plan_rows(fake_compile_check(), gpus=("H200",), tokens=(1, 16, 128, 4096))
    assert [(r.m, r.path) for r in rows[:4]] == [(1, "small_m"), (16, "small_m"), (128, "fused"), (4096, "dense")]
    q_fused, q_dense = rows[2], rows[3]
    assert q_fused.programs == 2 * 32  # cdiv(128, 64) x cdiv(4096, 128)
    assert q_dense.programs == 32 * 32  # cdiv(4096, 128) x cdiv(4096, 128)
    assert rows[0].programs == 32 * 16  # 4096 / 128 column tiles (the GPU's tile) x 16 K slices (split_k_for)


def test_ideal_and_issue_time():
    """ideal = max(bytes / HBM, FLOPs / peak); issue = lane instructions / (32 x 4 schedulers x SMs x clock)."""
    row = plan_rows(fake_compile_check(), gpus=("H200",), tokens=(1,))[0]
    gpu = GPUS["H200"]
    assert row.ideal_us == pytest.approx(1e6 * layer_bytes(1, 4096, 4096) / (gpu.hbm_tbps * 1e12))
    per_weight = 64 * 128 / (64 * 64)  # 64 warp instructions per trip, 128 threads, 4096 weights
    assert row.per_weight() == per_weight and row.per_weight("integer") == per_weight / 2
    want = 1e6 * per_weight * 4096 * 4096 / 32 / (4 * gpu.sms * gpu.clock_ghz * 1e9)
    assert row.issue_us == pytest.approx(want)


def test_the_table_has_a_row_per_gpu_layer_and_m():
    rows = plan_rows(fake_compile_check())
    assert len(rows) == len(GPUS) * 4 * 4
    table = format_plan(rows)
    for gpu in GPUS.values():
        assert f"{gpu.name}: {gpu.hbm_tbps} TB/s" in table
    assert table.count("down_proj") == len(GPUS) * 4
