"""Whose code is graded, decided from the learner's source before it runs (grading/authorship.py).

One-line wrappers around lora_lab's reference and lora_lab's own text compiled under the learner's file name scored
full marks when "not your code" was the learner's process's own report; each such submission is here, with the
untouched stubs and correct answers that must not be flagged."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_lab.conformance.grading.authorship import STUB_IMPORTS, not_the_learners
from lora_lab.conformance.grading.exercises import EXERCISES

ROOT = Path(__file__).resolve().parents[2]
STUBS = {e.stem: (ROOT / "exercises" / f"{e.stem}.py").read_text() for e in EXERCISES}

NOT_THE_LEARNERS = {
    "a wrapper of the reference": (
        "ex05_adamw", "from lora_lab.optim import adamw_step as ref\n\ndef adamw_step(*args, **kwargs):\n"
        "    return ref(*args, **kwargs)\n", "adamw_step from lora_lab.optim"),
    "the package itself": ("ex04_loss", "import lora_lab\n\nnext_token_loss = lora_lab.next_token_loss\n", "imports lora_lab"),
    "a name built at run time": ("ex04_loss", "import importlib\n\nnext_token_loss = importlib.import_module('lora_lab.loss')"
                                 ".next_token_loss\n", "importlib"),
    "lora_lab's text compiled as the learner's": (
        "ex04_loss", "import pathlib\n\nexec(compile(pathlib.Path('/x/loss.py').read_text(), 'ex04_loss.py', 'exec'))\n",
        "exec()"),
    "the lent function as the whole answer": (
        "ex01_nf4", "from lora_lab.nf4 import quantize_nf4 as _reference_quantize\n\n"
        "def quantize_nf4(weight, blocksize=64, double_quant=False):\n"
        "    return _reference_quantize(weight, blocksize, double_quant)\n", "hands its work"),
    "lora_lab's functions copied": ("ex01_nf4", (ROOT / "lora_lab" / "nf4.py").read_text(), "copied"),
    "a Triton exercise in plain torch": ("ex07_triton_dequant", "import torch\n\ndef dequantize_nf4(q):\n"
                                         "    return torch.zeros(q.shape, dtype=q.dtype)\n", "no @triton.jit kernel"),
}


@pytest.mark.parametrize("name", sorted(NOT_THE_LEARNERS))
def test_borrowed_code_is_found_before_anything_runs(name):
    stem, source, reason = NOT_THE_LEARNERS[name]
    verdict = not_the_learners(stem, source)
    assert verdict is not None and reason in verdict, verdict


@pytest.mark.parametrize("stem", sorted(STUBS))
def test_the_untouched_stubs_are_the_learners_and_import_only_what_they_may(stem):
    assert not_the_learners(stem, STUBS[stem]) is None
    assert stem in STUB_IMPORTS


def test_the_stubs_own_delegation_and_a_launched_kernel_are_the_learners():
    """Exercise 01 borrows the reference's double-quant statistics inside `if double_quant:`, as its stub does; a
    kernel that is defined and launched is a Triton answer."""
    ex01 = STUBS["ex01_nf4"].replace('raise NotImplementedError("exercise 01', 'return None  # ("exercise 01')
    assert not_the_learners("ex01_nf4", ex01) is None
    kernel = ("import triton\nimport triton.language as tl\n\n@triton.jit\ndef k(x_ptr, n, BLOCK: tl.constexpr):\n"
              "    pass\n\ndef dequantize_nf4(q):\n    k[(1,)](q.packed, 1, BLOCK=16)\n    return q\n")
    assert not_the_learners("ex07_triton_dequant", kernel) is None


def test_grade_gives_the_wrapper_no_points_with_the_reason(tmp_path):
    from lora_lab.conformance.grading.feedback import NOT_YOURS
    from lora_lab.conformance.grading.grade import grade

    stem, source, _ = NOT_THE_LEARNERS["a wrapper of the reference"]
    (tmp_path / f"{stem}.py").write_text(source)
    (report,) = grade(tmp_path, ["05"], stream=open("/dev/null", "w"))
    assert report.score == 0 and {row.status for row in report.rows} == {NOT_YOURS}
    assert "adamw_step from lora_lab.optim" in report.rows[0].detail


def test_a_files_own_command_line_is_not_graded():
    """``if __name__ == "__main__":`` runs only as ``python exercises/exNN.py`` (it calls the grader): never graded."""
    source = STUBS["ex05_adamw"] + "\n\nif __name__ == '__main__':\n    from lora_lab.optim import adamw_step\n"
    assert not_the_learners("ex05_adamw", source) is None
