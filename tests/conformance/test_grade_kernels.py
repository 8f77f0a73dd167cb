"""Learners' Triton kernels: a kernel that reads out of bounds loses the bounds check's points with a hint that says
which tensor and which side, and a correct kernel (a BLOCK smaller than the blocksize included) loses nothing.

The kernels are realistic learner files kept in tests/mutants/ (each also a mutant of the suite).
"""

import json
import os
from pathlib import Path

import pytest
import torch

from lora_lab.conformance.isolation.target import Target
from lora_lab.conformance.runner import FAILED, PASSED, all_checks, run_check

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="learners' kernels are graded under Triton's interpreter")
os.environ.setdefault("TRITON_INTERPRET", "1")

from test_grade import run_grade, write_exercise  # noqa: E402  (tests/conformance is on the path)

MUTANTS = Path(__file__).resolve().parents[1] / "mutants"
CHECKS = {c.name: c for c in all_checks()}
UNMASKED_DEQUANTIZE = (MUTANTS / "kernel_dequant_unmasked_loads.py").read_text()
UNMASKED_FORWARD = (MUTANTS / "kernel_forward_unmasked_loads.py").read_text()


def masked_dequantize(block: int) -> str:
    """The unmasked learner kernel with its masks put back, and a BLOCK of ``block`` elements per program."""
    source = UNMASKED_DEQUANTIZE
    for load in ("tl.load(packed_ptr + offs // 2", "tl.load(absmax_ptr + offs // BLOCKSIZE"):
        source = source.replace(f"{load})", f"{load}, mask=offs < numel)")
    assert source.count("mask=offs < numel") == 3
    return source.replace("BLOCK = 256", f"BLOCK = {block}")


def test_a_dequantize_kernel_with_unmasked_loads_loses_exactly_the_bounds_points(tmp_path):
    write_exercise(tmp_path, "ex07_triton_dequant", UNMASKED_DEQUANTIZE)
    (report,), output = run_grade(tmp_path, ["07"])
    statuses = {row.graded.check.name: row.status for row in report.rows}
    assert statuses == {"nf4.dequantize_matches_bitsandbytes": PASSED, "bounds.dequantize_nf4": FAILED,
                        "nf4.dequantize_realistic_size": PASSED,
                        "triton.compiles_for_gpu": PASSED}, output  # it compiles: reading past a tensor is no compile error
    assert "past the end of packed_ptr" in output and CHECKS["bounds.dequantize_nf4"].hint in output


def test_a_dequantize_kernel_with_a_block_smaller_than_the_blocksize_scores_full_marks(tmp_path):
    write_exercise(tmp_path, "ex07_triton_dequant", masked_dequantize(block=128))
    (report,), output = run_grade(tmp_path, ["07"])
    assert report.score == report.total, output


def test_a_fused_forward_with_unmasked_loads_fails_the_bounds_check_naming_the_tensor():
    unmasked = Target("unmasked", _module(UNMASKED_FORWARD))
    result = run_check(CHECKS["bounds.qlora_linear"], unmasked)
    assert result.status == FAILED and "qlora_forward_kernel read" in result.detail, result.detail
    assert any(f"past the end of {name}" in result.detail for name in ("x_ptr", "packed_ptr", "absmax_ptr")), result.detail


def test_the_same_forward_with_its_masks_is_in_bounds():
    masked = Target("masked", _module(UNMASKED_FORWARD.replace("MASK_LOADS = False", "MASK_LOADS = True")))
    result = run_check(CHECKS["bounds.qlora_linear"], masked)
    assert result.status == PASSED, result.detail


def _module(source: str):
    import types

    module = types.ModuleType("learner_kernel")
    exec(compile(source, "learner_kernel.py", "exec"), module.__dict__)  # noqa: S102 - our own test source
    return module


def test_a_kernel_with_no_masks_at_all_is_graded_to_the_end(tmp_path, capsys):
    """Its stores write past the output too: under the interpreter that corrupts the heap of the process it runs in
    (glibc aborted the grader once, before the Score line). Graded in its own process, it costs only its own rows."""
    source = UNMASKED_DEQUANTIZE.replace("tl.store(out_ptr + offs, values, mask=offs < numel)",
                                         "tl.store(out_ptr + offs, values)").replace("BLOCK = 256", "BLOCK = 4096")
    assert "mask=" not in source.split("def dequantize_nf4")[0].split("@triton.jit")[1]
    write_exercise(tmp_path, "ex07_triton_dequant", source)
    report_file = tmp_path / "grade.json"
    from lora_lab.cli import main

    assert main(["grade", "--only", "07", "--path", str(tmp_path), "--json", str(report_file)]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("Score: ")
    (graded,) = json.loads(report_file.read_text())["exercises"]
    bounds = next(r for r in graded["checks"] if r["check"] == "bounds.dequantize_nf4")
    assert bounds["status"] in ("failed", "error") and bounds["points"] == 0, bounds
    assert graded["score"] < graded["total"]
