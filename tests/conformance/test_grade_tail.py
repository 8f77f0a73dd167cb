"""Exercise 07 past 2^24 elements (issue #26): under Triton's interpreter only the tail of the learner's grid runs first.

A block index computed in float32 is wrong only past 2^24 elements, and the interpreter takes 10-20 s for a weight that
large. ``nf4.dequantize_realistic_size`` therefore runs, for a target that uses Triton, only the programs that write
elements 2^24 onwards (``isolation.probes.TailOfGrid``) and compares those; when they are not right it runs the call
whole before deducting anything. So the float32 index loses the check's points, the exercise's layout passes in about a
second, and a correct kernel that maps programs to elements otherwise (a grid-stride loop) keeps full marks on its
full run.
"""

from __future__ import annotations

import pytest
import torch
from test_grade import assert_loses_exactly, run_grade, write_exercise

from lora_lab.conformance.grading.exercises import EXERCISES
from lora_lab.conformance.runner import PASSED

FLOAT32_INDEX = '''
"""A learner's Triton dequantize whose block index is computed in float32: right below 2^24 elements, wrong past it."""
import torch
import triton
import triton.language as tl

from lora_lab.nf4 import NF4_CODE

BLOCK = 1024


@triton.jit
def nf4_dequantize_kernel(packed_ptr, levels_ptr, absmax_ptr, out_ptr, numel, BLOCKSIZE: tl.constexpr,
                          BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0)
    code = tl.where(offs % 2 == 0, byte >> 4, byte & 0x0F).to(tl.int32)
    block = (offs.to(tl.float32) / BLOCKSIZE).to(tl.int64)
    absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    tl.store(out_ptr + offs, tl.load(levels_ptr + code, mask=mask, other=0.0) * absmax, mask=mask)


def dequantize_nf4(q):
    out = torch.empty(q.numel, dtype=torch.float32)
    nf4_dequantize_kernel[(triton.cdiv(q.numel, BLOCK),)](q.packed, NF4_CODE, q.absmax_fp32(), out, q.numel,
                                                        BLOCKSIZE=q.blocksize, BLOCK=BLOCK)
    return out.to(q.dtype).reshape(q.shape)
'''

# Correct, and mapped otherwise: at most 64 programs, each striding over the weight. Its grid's tail holds no
# particular elements, so the tail comparison fails and the full run decides.
GRID_STRIDE = FLOAT32_INDEX.replace('''    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0)
    code = tl.where(offs % 2 == 0, byte >> 4, byte & 0x0F).to(tl.int32)
    block = (offs.to(tl.float32) / BLOCKSIZE).to(tl.int64)
    absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    tl.store(out_ptr + offs, tl.load(levels_ptr + code, mask=mask, other=0.0) * absmax, mask=mask)''',
    '''    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(tl.program_id(0).to(tl.int64) * BLOCK, numel, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < numel
        byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0)
        code = tl.where(offs % 2 == 0, byte >> 4, byte & 0x0F).to(tl.int32)
        absmax = tl.load(absmax_ptr + offs // BLOCKSIZE, mask=mask, other=0.0)
        tl.store(out_ptr + offs, tl.load(levels_ptr + code, mask=mask, other=0.0) * absmax, mask=mask)''').replace(
    "(triton.cdiv(q.numel, BLOCK),)", "(min(triton.cdiv(q.numel, BLOCK), 64),)").replace(
    "whose block index is computed in float32: right below 2^24 elements, wrong past it",
    "whose programs stride over the weight: correct, mapped unlike the exercise's layout")

# Correct, on a 2-D grid: axis 0 the weight's rows, axis 1 tiles of its columns. Its tail rows hold the tail elements.
TWO_D_GRID = FLOAT32_INDEX.replace(
    "    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)\n    mask = offs < numel\n",
    "    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)\n"
    "    offs = tl.program_id(0).to(tl.int64) * COLS + columns\n    mask = columns < COLS\n").replace(
    "block = (offs.to(tl.float32) / BLOCKSIZE).to(tl.int64)", "block = offs // BLOCKSIZE").replace(
    "numel, BLOCKSIZE: tl.constexpr,", "numel, COLS, BLOCKSIZE: tl.constexpr,").replace(
    "[(triton.cdiv(q.numel, BLOCK),)](q.packed, NF4_CODE, q.absmax_fp32(), out, q.numel,",
    "[(q.shape[0], triton.cdiv(q.shape[-1], BLOCK))](q.packed, NF4_CODE, q.absmax_fp32(), out, q.numel, q.shape[-1],"
).replace("whose block index is computed in float32: right below 2^24 elements, wrong past it",
          "on a 2-D grid of rows and column tiles (2-D weights only): correct")

EX07 = next(e for e in EXERCISES if e.id == "07")


def test_exercise_07_grades_the_weight_past_2_24():
    assert "nf4.dequantize_realistic_size" in dict(EX07.borrowed)


def test_float32_index_kernel_loses_the_realistic_points(tmp_path):
    assert_loses_exactly(tmp_path, "ex07_triton_dequant", FLOAT32_INDEX, {"nf4.dequantize_realistic_size"})


def test_grid_stride_kernel_keeps_full_marks(tmp_path):
    assert GRID_STRIDE != FLOAT32_INDEX and "offs.to(tl.float32)" not in GRID_STRIDE
    write_exercise(tmp_path, "ex07_triton_dequant", GRID_STRIDE)
    (report,), output = run_grade(tmp_path, ["07"])
    assert {row.graded.check.name: row.status for row in report.rows}["nf4.dequantize_realistic_size"] == PASSED, output
    assert report.score == report.total, output


def _interpreted_kernel():
    """A kernel that writes its program id into its BLOCK elements, under Triton's interpreter (or a skip)."""
    from lora_lab.kernels.common import INTERPRETING

    if not INTERPRETING:
        pytest.skip("TailOfGrid acts on Triton's interpreter; this machine runs kernels compiled")
    import triton
    import triton.language as tl

    @triton.jit
    def program_ids(out_ptr, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.program_id(0).to(tl.float32) + tl.zeros([BLOCK], tl.float32), mask=offs < numel)

    return program_ids


def test_tail_of_grid_runs_the_programs_of_the_tail_only():
    from triton.runtime.interpreter import GridExecutor

    from lora_lab.conformance.isolation.probes import TailOfGrid

    kernel, numel, block = _interpreted_kernel(), 40, 4
    launch, whole = GridExecutor.__call__, torch.arange(numel, dtype=torch.float32).div(block).floor()
    out = torch.full((numel,), -1.0)
    with TailOfGrid(20, numel) as tail:  # 10 programs; elements 20.. are programs 5..; 2 of margin: 3.. run
        kernel[(numel // block,)](out, numel, BLOCK=block)
    assert tail.skipped == 3
    assert torch.equal(out[20:], whole[20:])
    assert torch.equal(out[:12], torch.full((12,), -1.0))  # programs 0-2 never ran
    assert GridExecutor.__call__ is launch  # the launcher is Triton's own again (or the suite's other wrappers)
    kernel[(numel // block,)](out, numel, BLOCK=block)
    assert torch.equal(out, whole)  # outside the context every program runs


def test_two_d_grid_kernel_keeps_full_marks(tmp_path):
    assert TWO_D_GRID.count("COLS") == 3 and "offs.to(tl.float32)" not in TWO_D_GRID
    write_exercise(tmp_path, "ex07_triton_dequant", TWO_D_GRID)
    (report,), output = run_grade(tmp_path, ["07"])
    assert {row.graded.check.name: row.status for row in report.rows}["nf4.dequantize_realistic_size"] == PASSED, output
