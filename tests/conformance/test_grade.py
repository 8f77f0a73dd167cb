"""``lora-lab grade``: untouched stubs score 0, the reference scores full marks, and typical mistakes lose exactly
the points of the checks that should catch them, with the hint a learner needs.

Mistakes are written as small exercise files in ``tmp_path``, built on lora_lab's
reference with one realistic change each (the pattern of tests/mutants/).
Grading runs in this process through ``grade()``, the function behind the command.
"""

from __future__ import annotations

import io
import json
import os
import re
import textwrap
from pathlib import Path

import pytest
import torch

from lora_lab.conformance.grading.command import main
from lora_lab.conformance.grading.exercises import EXERCISES, graded_checks
from lora_lab.conformance.grading.feedback import NOT_YOURS
from lora_lab.conformance.grading.grade import ExerciseReport, grade, next_step
from lora_lab.conformance.runner import ERROR, FAILED, NOT_ATTEMPTED, PASSED, all_checks

if not torch.cuda.is_available():  # as lora_lab.kernels does, but before any test imports triton (bitsandbytes does)
    os.environ.setdefault("TRITON_INTERPRET", "1")

EXERCISES_DIR = Path(__file__).resolve().parents[2] / "exercises"
CHECKS = {c.name: c for c in all_checks()}

def run_grade(folder: Path | None, only: list[str] | None = None, profile: str = "ci",
              authorship: bool = False) -> tuple[list[ExerciseReport], str]:
    """Grade as the command does. These tests measure what the checks catch, with mistakes written as lora_lab's
    reference changed in one line, so the source-level authorship verdict (test_authorship.py) is off by default."""
    out = io.StringIO()
    reports = grade(folder, only, profile, stream=out, authorship=authorship)
    return reports, out.getvalue()


def score(reports: list[ExerciseReport]) -> tuple[int, int]:
    return sum(r.score for r in reports), sum(r.total for r in reports)


def test_every_exercise_has_its_file_and_the_grade_is_worth_at_least_100_points():
    for exercise in EXERCISES:
        assert (EXERCISES_DIR / f"{exercise.stem}.py").is_file(), f"exercises/{exercise.stem}.py is missing"
        for name, _ in exercise.borrowed:
            assert name in CHECKS, f"exercise {exercise.id} borrows an unknown check {name!r}"
    total = sum(g.points for e in EXERCISES for g in graded_checks(e))
    assert total >= 100, f"the exercises are worth only {total} points"


def test_untouched_stubs_score_zero_and_are_not_attempted():
    reports, _ = run_grade(EXERCISES_DIR)
    got, total = score(reports)
    assert got == 0 and total == sum(g.points for e in EXERCISES for g in graded_checks(e))
    for report in reports:
        for row in report.rows:
            assert row.status == NOT_ATTEMPTED, f"{report.exercise.id} {row.graded.check.name}: {row.status}\n{row.detail}"
            assert row.detail.startswith(f"exercise {report.exercise.id}"), "the row names the stub to write"
    advice = next_step(reports, EXERCISES_DIR)
    assert "exercise 01" in advice and "lora-lab grade --only 01" in advice


def test_reference_solutions_score_full_marks():
    # On a CUDA machine lora_lab.kernels (imported by other tests) compiles for the GPU, but the checks hand it CPU
    # tensors; `lora-lab grade` runs Triton under its interpreter there (a fresh process), this process cannot.
    only = None if not torch.cuda.is_available() else [e.id for e in EXERCISES if e.solution == "lora_lab"]
    reports, _ = run_grade(None, only)
    got, total = score(reports)
    failures = [(r.exercise.id, row.graded.check.name, row.status, row.detail) for r in reports for row in r.rows
                if row.status != PASSED]
    assert not failures and got == total, failures
    assert {r.source for r in reports} == {e.solution for e in EXERCISES if not only or e.id in only}


def test_command_prints_the_score_line_writes_json_and_exits_zero(tmp_path, capsys):
    report = tmp_path / "runs" / "grade.json"  # a missing folder is made
    assert main(["--only", "02", "--path", str(EXERCISES_DIR), "--json", str(report)]) == 0
    output = capsys.readouterr().out
    assert output.rstrip().splitlines()[-1] == "Score: 0/10"
    data = json.loads(report.read_text())
    assert (data["score"], data["total"]) == (0, 10)
    assert data["exercises"][0]["checks"][0]["status"] == "not attempted"
    assert not (EXERCISES_DIR / ".hypothesis").exists(), "grading must not leave a hypothesis database among the exercises"


def test_a_missing_folder_explains_how_to_start(tmp_path, capsys):
    assert main(["--path", str(tmp_path / "nowhere")]) == 2
    message = capsys.readouterr().err
    assert "lora-lab grade --path" in message and "lora-lab grade --only 01" in message


def write_exercise(folder: Path, stem: str, source: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / f"{stem}.py"
    path.write_text(textwrap.dedent(source))
    return path


MISTAKES = {
    "low_nibble_first": (
        "ex01_nf4",
        '''
        """Packs element 2i in the LOW nibble, and unpacks it from there: round trips still work, the bytes do not."""
        from dataclasses import replace

        from lora_lab.nf4 import dequantize_nf4 as reference_dequantize
        from lora_lab.nf4 import quantize_nf4 as reference_quantize


        def swap_nibbles(packed):
            return ((packed & 0x0F) << 4) | (packed >> 4)


        def quantize_nf4(weight, blocksize=64, double_quant=False):
            q = reference_quantize(weight, blocksize, double_quant)
            return replace(q, packed=swap_nibbles(q.packed))


        def dequantize_nf4(q):
            return reference_dequantize(replace(q, packed=swap_nibbles(q.packed)))
        ''',
        {"nf4.bytes_match_bitsandbytes", "nf4.dequantize_matches_bitsandbytes", "nf4.quantize_realistic_size",
         "nf4.dequantize_realistic_size"},
    ),
    "scaling_forgotten": (
        "ex03_qlora_linear",
        '''
        """Adds the LoRA path without multiplying it by scaling (alpha / r)."""
        from lora_lab.lora import base_path
        from lora_lab.operands import check_qlora_operands


        def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
            check_qlora_operands(x, weight, lora_A, lora_B, bias)
            return base_path(x, weight, bias) + (x @ lora_A.to(x.dtype).t()) @ lora_B.to(x.dtype).t()
        ''',
        {"qlora.forward_matches_float64", "qlora.gradients_match_float64", "qlora.matches_peft_bitsandbytes",
         "qlora.llama_shapes"},
    ),
    "loss_without_the_shift": (
        "ex04_loss",
        '''
        """Compares position t's logits with label t (no shift): it trains the model to copy its input."""
        import torch.nn.functional as F

        from lora_lab.loss import check_loss_inputs


        def next_token_loss(logits, labels, ignore_index=-100):
            check_loss_inputs(logits, labels, ignore_index)
            vocab = logits.shape[-1]
            return F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1), ignore_index=ignore_index)
        ''',
        {"loss.matches_shift_and_mask", "loss.matches_transformers", "loss.llama_vocab"},
    ),
    "adam_with_l2_instead_of_decoupled_decay": (
        "ex05_adamw",
        '''
        """Adds weight_decay * param to the gradient (Adam with L2), instead of shrinking param directly (AdamW)."""
        from lora_lab.optim import adamw_step as reference_step


        def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
            reference_step(param, grad + weight_decay * param, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay=0.0)
        ''',
        {"adamw.matches_torch"},
    ),
    "merges_the_adapter_into_the_weight": (
        "ex03_qlora_linear",
        '''
        """Forms W + scaling * B @ A and multiplies once: the right numbers through an N x K matrix LoRA exists to avoid."""
        from lora_lab.nf4 import dequantize_nf4
        from lora_lab.operands import check_qlora_operands


        def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
            check_qlora_operands(x, weight, lora_A, lora_B, bias)
            merged = dequantize_nf4(weight).to(x.dtype) + scaling * (lora_B.to(x.dtype) @ lora_A.to(x.dtype))
            y = x @ merged.t()
            return y if bias is None else y + bias.to(x.dtype)
        ''',
        {"memory.qlora_linear_keeps_no_dense_weight"},
    ),
    "no_shape_checks": (
        "ex03_qlora_linear",
        '''
        """Computes the right thing but never checks shapes: a wrong bias broadcasts instead of raising."""
        from lora_lab.lora import base_path, lora_path


        def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
            return base_path(x, weight, bias) + lora_path(x, lora_A, lora_B, scaling)
        ''',
        {"qlora.rejects_bad_input"},
    ),
}


def assert_loses_exactly(tmp_path: Path, stem: str, source: str, caught: set[str], statuses=(FAILED,)) -> None:
    """Graded, ``source`` loses the points of the checks in ``caught`` and no others, each with its hint shown."""
    assert caught <= set(CHECKS), f"unknown checks {sorted(caught - set(CHECKS))}: were they renamed?"
    write_exercise(tmp_path, stem, source)
    exercise = next(e for e in EXERCISES if e.stem == stem)
    (report,), output = run_grade(tmp_path, [exercise.id])
    lost = {row.graded.check.name for row in report.rows if row.status != PASSED}
    assert lost == caught, output
    assert all(row.status in statuses for row in report.rows if row.graded.check.name in caught), output
    assert report.score == report.total - sum(row.graded.points for row in report.rows if row.graded.check.name in caught)
    for name in caught:
        assert CHECKS[name].hint in output, f"the hint of {name} is not shown"
    assert output.rstrip().splitlines()[-1].endswith(f"for exercise {exercise.id}")


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_typical_mistake_loses_exactly_the_points_of_the_checks_that_catch_it(tmp_path, mistake):
    assert_loses_exactly(tmp_path, *MISTAKES[mistake])


def test_an_error_in_learner_code_shows_the_learners_own_lines(tmp_path):
    path = write_exercise(tmp_path, "ex03_qlora_linear", '''
        import torch


        def lora_update(x, lora_A, lora_B):
            return x @ lora_A.transpose() @ lora_B.transpose()  # transpose() without the two dimensions


        def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
            if x.shape[-1] != weight.shape[1] or lora_A.shape[1] != weight.shape[1] or lora_B.shape[0] != weight.shape[0]:
                raise ValueError("bad shapes")
            if bias is not None and bias.shape != (weight.shape[0],):
                raise ValueError("bad bias")
            return scaling * lora_update(x, lora_A, lora_B)
        ''')
    (report,), output = run_grade(tmp_path, ["03"])
    errors = [row for row in report.rows if row.status == ERROR]
    assert errors, output
    for row in errors:
        assert str(path) in row.detail and "in lora_update" in row.detail and "in qlora_linear" in row.detail, row.detail
        assert "lora_lab/conformance" not in row.detail and "hypothesis" not in row.detail
    assert report.score == 3  # only the shape checks pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernel's line comes from Triton's interpreter (CPU only here)")
def test_an_error_inside_a_triton_kernel_shows_the_kernels_line(tmp_path):
    path = write_exercise(tmp_path, "ex07_triton_dequant", '''
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
        import torch
        import triton
        import triton.language as tl


        @triton.jit
        def broken_kernel(out_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            values = tl.where(offs < 4, offs, offs[:, None])  # broadcasts to (BLOCK, BLOCK)
            tl.store(out_ptr + offs, values)  # a (BLOCK,) pointer for (BLOCK, BLOCK) values


        def dequantize_nf4(q):
            out = torch.zeros(64 * 64)
            broken_kernel[(1,)](out, BLOCK=64)
            return out
        ''')
    (report,), output = run_grade(tmp_path, ["07"])
    assert len(report.rows) == 4, output  # the values checks (drawn, past 2^24), the bounds check and the compile check
    for row in report.rows:
        assert row.status == ERROR, output
        assert f'{path}", line 14, in broken_kernel\n    tl.store(' in row.detail, row.detail
        assert "in dequantize_nf4" in row.detail, row.detail


def test_a_file_that_does_not_import_is_an_error_not_a_crash(tmp_path):
    write_exercise(tmp_path, "ex02_double_quant", "def quantize_nf4(weight, blocksize:\n    pass\n")
    (report,), output = run_grade(tmp_path, ["02"])
    assert report.score == 0 and report.rows
    assert all(row.status == ERROR and "does not import" in row.detail and "SyntaxError" in row.detail for row in report.rows)


def test_one_exercise_can_import_another_and_nothing_leaks_between_folders(tmp_path):
    # The learner's 01 is a function of its own file (one that delegates: importing between exercises is the subject
    # here, and a plain re-export of lora_lab's function is "not your code").
    write_exercise(tmp_path / "a", "ex01_nf4", """
        from lora_lab.nf4 import quantize_nf4 as reference


        def quantize_nf4(weight, blocksize=64, double_quant=False):
            return reference(weight, blocksize, double_quant)
        """)
    write_exercise(tmp_path / "a", "ex02_double_quant", "from ex01_nf4 import quantize_nf4  # the learner's own 01\n")
    (report,), _ = run_grade(tmp_path / "a", ["02"])
    assert report.score == report.total > 0
    write_exercise(tmp_path / "b", "ex02_double_quant", "from ex01_nf4 import quantize_nf4\n")  # no ex01 here
    (report,), _ = run_grade(tmp_path / "b", ["02"])
    assert {row.status for row in report.rows} == {ERROR} and all("ModuleNotFoundError" in row.detail for row in report.rows)


def test_lora_labs_own_functions_imported_into_an_exercise_are_not_your_code(tmp_path):
    """``from lora_lab.nf4 import *`` in an exercise file scored full marks once; it is lora_lab's work, not the learner's."""
    write_exercise(tmp_path, "ex01_nf4", "from lora_lab.nf4 import *  # noqa: F403\n")
    (report,), output = run_grade(tmp_path, ["01"])
    assert report.score == 0 and {row.status for row in report.rows} == {NOT_YOURS}, output
    assert "lora_lab's own reference (lora_lab.nf4)" in report.rows[0].detail


def test_a_scored_run_draws_a_recorded_seed(tmp_path, capsys):
    report = tmp_path / "grade.json"
    assert main(["--only", "05", "--path", str(EXERCISES_DIR), "--profile", "scored", "--json", str(report)]) == 0
    seed = json.loads(report.read_text())["seed"]
    assert isinstance(seed, int) and f"seed {seed}" in capsys.readouterr().out


def test_a_random_profile_prints_no_hypothesis_seed_advice(capsys):
    """Under ``dev`` hypothesis used to print "reproduce with @seed(...)" above each untouched stub's row."""
    reports, table = run_grade(EXERCISES_DIR, ["02"], profile="dev")
    assert all(row.status == NOT_ATTEMPTED for row in reports[0].rows)
    printed = capsys.readouterr()
    assert "@seed" not in printed.out + printed.err + table


def test_the_readme_grading_example_shows_the_checks_real_descriptions_and_hints():
    readme = (EXERCISES_DIR.parent / "README.md").read_text()
    example = readme.split("### Reading the table", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    rows = [line.split() for line in example.splitlines() if line.startswith("  failed")]
    hints = [line.strip().removeprefix("hint: ") for line in example.splitlines() if line.strip().startswith("hint: ")]
    assert rows and len(hints) == len(rows)
    for row, hint in zip(rows, hints):
        assert CHECKS[row[1]].hint == hint, f"README's hint for {row[1]} is not the check's"


README_LOSS_MISTAKE = '''
"""The README's example: a loss that forgets the shift and refuses nothing."""
import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    logits = logits.float()
    mask = labels != ignore_index
    return F.cross_entropy(logits[mask], labels[mask])
'''


def test_the_readme_grading_example_is_what_grade_prints_for_its_mistake(tmp_path):
    """The printed table in "Reading the table" is the grader's real output for the mistake it describes, but for
    the seconds column (rows, statuses, points, details, hints and the total all kept true)."""
    readme = (EXERCISES_DIR.parent / "README.md").read_text()
    example = readme.split("### Reading the table", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    write_exercise(tmp_path, "ex04_loss", README_LOSS_MISTAKE)
    _, table = run_grade(tmp_path, ["04"])

    def without_seconds(text: str) -> list[str]:
        lines = [line.rstrip() for line in text.splitlines() if line.strip()]
        lines = [line.replace(str(tmp_path) + "/", "exercises/") for line in lines]
        return [re.sub(r"\s+\d+\.\ds  ", "  ", line) for line in lines]

    printed = without_seconds(table)
    start = next(i for i, line in enumerate(printed) if line.startswith("04  "))
    end = next(i for i, line in enumerate(printed) if line.endswith("for exercise 04"))
    assert printed[start : end + 1] == without_seconds(example)
