"""One distributed QLoRA step equals one single-process step (torchrun, gloo, 2 CPU processes).

Each test launches torchrun as a subprocess with a hard time limit, so a hung
collective fails the test instead of the suite.
"""

import json
import math
import subprocess
import sys

import pytest

MODULE = "lora_lab.finetune.distributed"
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", MODULE]
TIME_LIMIT_S = 240


def _launch(*args: str, timeout: float = TIME_LIMIT_S) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *args], capture_output=True, text=True, timeout=timeout, env=None)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_step_equals_single_process_step(tmp_path, mode):
    out = tmp_path / "report.json"
    run = _launch("check", "--out", str(out), *(["--fsdp"] if mode == "fsdp2" else []))
    assert run.returncode == 0, run.stderr[-3000:]
    reports = json.loads(out.read_text())
    assert [r["rank"] for r in reports] == [0, 1]
    for r in reports:
        assert r["mode"] == mode and r["world_size"] == 2
        # fp32 mean over the labelled tokens, summed in another order: a few u of the loss.
        assert math.isclose(r["distributed_loss"], r["single_process_loss"], rel_tol=8 * 2.0**-24, abs_tol=0)
        assert r["adapter_elements_beyond_tolerance"] == 0, r
        assert r["nf4_bit_identical"] and r["frozen_bit_identical"]
        # Two fp32 AdamW moments per adapter element: all of them under DDP, half per rank under FSDP2.
        moments = 2 * 4 * r["adapter_elements"]
        assert r["memory_bytes"]["adam_moments"] == (moments // 2 if mode == "fsdp2" else moments)


def test_a_failing_rank_stops_every_rank_quickly():
    # The bound: torchrun must tear the healthy rank down long before its 120 s collective timeout.
    run = _launch("check", "--fail-rank", "1", timeout=90)
    assert run.returncode != 0
    assert "failing on purpose" in run.stderr + run.stdout


def test_without_torchrun_the_error_says_how_to_launch():
    run = subprocess.run([sys.executable, "-m", MODULE, "check"], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "torchrun" in run.stderr
