"""The exercises and the checks that grade each one: the table `lora-lab grade` scores against.

Each exercise is graded by the checks whose ``exercise`` field names it, plus the checks it borrows from the op
it accelerates (the Triton exercises reuse the torch ops' checks, for more points).
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_lab.conformance.grading.gpu_compile import compile_check
from lora_lab.conformance.registry import Check
from lora_lab.conformance.runner import all_checks


@dataclass(frozen=True)
class Exercise:
    id: str  # "01" ... "08": the `exercise` field of the checks that grade it
    stem: str  # file name without .py; starts with "ex" so that one exercise can import another
    title: str
    solution: str  # importable module graded by --solutions: the reference solution
    borrowed: tuple[tuple[str, int], ...] = ()  # (check name, points here) for checks whose `exercise` is another one
    # (operation, points) for a Triton exercise: its kernels must compile for a GPU (gpu_compile), checked last
    compiles: tuple[str, int] | None = None


EXERCISES = (
    Exercise("01", "ex01_nf4", "NF4: quantize and dequantize", "lora_lab"),
    Exercise("02", "ex02_double_quant", "NF4 double quantization", "lora_lab"),
    Exercise("03", "ex03_qlora_linear", "the QLoRA linear op", "lora_lab"),
    Exercise("04", "ex04_loss", "next-token loss with prompt masking", "lora_lab"),
    Exercise("05", "ex05_adamw", "AdamW by hand", "lora_lab"),
    Exercise("06", "ex06_training_step", "apply QLoRA and train one step", "lora_lab"),
    # The Triton exercises reuse the checks of the ops they accelerate; a kernel is worth more than the torch version.
    Exercise("07", "ex07_triton_dequant", "a Triton NF4 dequantize kernel", "lora_lab.kernels",
             # past 2^24 elements too, as many points as the drawn sizes (under the interpreter only the grid's tail
             # runs first: properties.realistic._tail_is_right)
             borrowed=(("nf4.dequantize_matches_bitsandbytes", 12), ("nf4.dequantize_realistic_size", 12)),
             compiles=("dequantize_nf4", 4)),
    Exercise("08", "ex08_triton_forward", "the fused Triton QLoRA forward (backward as a stretch)", "lora_lab.kernels",
             borrowed=(("qlora.forward_matches_float64", 15), ("qlora.rejects_bad_input", 3),
                       ("qlora.gradients_match_float64", 12), ("memory.qlora_linear_keeps_no_dense_weight", 5)),
             compiles=("qlora_linear", 5)),
)


@dataclass(frozen=True)
class GradedCheck:
    """One row of an exercise's table: a check of the suite and the points it is worth in this exercise."""

    check: Check
    points: int


def selected_checks(exercise: Exercise, prefixes: list[str] | None) -> list[GradedCheck]:
    """The exercise's graded checks whose names start with one of ``prefixes`` (all of them when None)."""
    return [g for g in graded_checks(exercise) if not prefixes or g.check.name.startswith(tuple(prefixes))]


def graded_checks(exercise: Exercise, checks: list[Check] | None = None) -> list[GradedCheck]:
    """The checks that grade ``exercise``: those whose ``exercise`` field names it, the borrowed ones, then (last: it
    compiles what the others launched) a Triton exercise's compile check."""
    checks = all_checks() if checks is None else checks
    by_name = {c.name: c for c in checks}
    rows = [GradedCheck(c, c.points) for c in checks if c.exercise == exercise.id]
    rows += [GradedCheck(by_name[name], points) for name, points in exercise.borrowed if name in by_name]
    if exercise.compiles:
        operation, points = exercise.compiles
        rows.append(GradedCheck(compile_check(operation, exercise.id, points), points))
    return rows

