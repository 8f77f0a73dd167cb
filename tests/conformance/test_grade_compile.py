"""The Triton exercises' compile check (grading/gpu_compile.py): a kernel the interpreter runs but no GPU would
compile loses the check's points with Triton's own message; a kernel that compiles keeps them, a spill only earns a
hint; and the launches it compiles are the ones the learner's code made (isolation/kernel_launches.py).

The kernels are the learner-style exercise 08 answer kept in tests/mutants/, with its masks on (a correct answer),
and one edit of it: the adapter's rank padded to 4 instead of 16.
"""

import importlib.util
import io
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from lora_lab.conformance.grading.exercises import EXERCISES
from lora_lab.conformance.grading.gpu_compile import choose, compile_launches, judge, trim
from lora_lab.conformance.isolation import kernel_launches
from lora_lab.conformance.runner import FAILED, PASSED

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="learners' kernels are graded under Triton's interpreter")
os.environ.setdefault("TRITON_INTERPRET", "1")

from test_grade import write_exercise  # noqa: E402  (tests/conformance is on the path)

MUTANTS = Path(__file__).resolve().parents[1] / "mutants"
FORWARD = (MUTANTS / "kernel_forward_unmasked_loads.py").read_text().replace("MASK_LOADS = False", "MASK_LOADS = True")
PADDED_TO_4 = FORWARD.replace("max(16, triton.next_power_of_2(r))", "max(4, triton.next_power_of_2(r))")
EX08 = next(e for e in EXERCISES if e.id == "08")


def grade_08(folder: Path, checks: list[str]):
    from lora_lab.conformance.grading.grade import grade

    out = io.StringIO()
    (report,) = grade(folder, ["08"], stream=out, checks=checks, authorship=False)
    return {row.graded.check.name: row for row in report.rows}, out.getvalue()


def test_a_forward_whose_adapter_dot_has_k_4_passes_the_interpreter_but_not_the_compile_check(tmp_path):
    assert PADDED_TO_4 != FORWARD
    write_exercise(tmp_path, EX08.stem, PADDED_TO_4)
    rows, output = grade_08(tmp_path, ["qlora.forward_matches", "bounds.qlora", "triton.compiles"])
    statuses = {name: row.status for name, row in rows.items()}
    assert statuses == {"bounds.qlora_linear": PASSED, "qlora.forward_matches_float64": PASSED,
                        "triton.compiles_for_gpu": FAILED}, output
    detail = rows["triton.compiles_for_gpu"].detail
    assert re.search(r"K >= (8|16)", detail), detail  # Triton's own message
    dot_line = 1 + next(i for i, line in enumerate(PADDED_TO_4.splitlines()) if "tl.dot(xa" in line)
    assert f"ex08_triton_forward.py, line {dot_line}:" in detail and "tl.dot(xa, tl.trans(b)" in detail, detail
    assert "R_PAD = max(16, triton.next_power_of_2(r))" in detail, "the learner's hint for a tl.dot dimension under 16"
    assert rows["triton.compiles_for_gpu"].score == 0 and rows["qlora.forward_matches_float64"].score > 0


def test_the_same_forward_padded_to_16_compiles_for_both_gpus(tmp_path):
    write_exercise(tmp_path, EX08.stem, FORWARD)
    rows, output = grade_08(tmp_path, ["triton.compiles"])
    row = rows["triton.compiles_for_gpu"]
    assert row.status == PASSED and row.score == row.graded.points, output + row.detail


def test_a_dequantize_written_in_torch_has_no_kernel_to_compile(tmp_path):
    from lora_lab.conformance.grading.grade import grade

    write_exercise(tmp_path, "ex07_triton_dequant", '''
        import torch

        from lora_lab.nf4 import NF4_CODE


        def dequantize_nf4(q):
            n = q.shape.numel()
            codes = torch.stack([q.packed >> 4, q.packed & 0x0F], dim=1).reshape(-1)[:n].long()
            absmax = q.absmax_fp32().repeat_interleave(q.blocksize)[:n]
            return (NF4_CODE[codes] * absmax).to(q.dtype).reshape(q.shape)
        ''')
    out = io.StringIO()
    (report,) = grade(tmp_path, ["07"], stream=out, checks=["triton.compiles"], authorship=False)
    (row,) = report.rows
    assert row.status == FAILED and "launched no Triton kernel" in row.detail, out.getvalue()


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def test_the_recorder_keeps_the_learners_launches_as_triton_specializes_them_and_they_compile(tmp_path):
    """Recorded in this process under the interpreter, then compiled in the compile-only process: at r = 64 the
    adapter's 64-wide tile spills on this kernel's 32x32 tiles, a hint and not a failure."""
    from lora_lab.nf4 import quantize_nf4

    path = tmp_path / "learner_forward_compile.py"
    path.write_text(FORWARD)
    module = _load(path)
    kernel_launches.install(tmp_path)
    try:
        weight = quantize_nf4(torch.randn(40, 64) * 0.05, blocksize=64)
        for r in (64, 64, 3):  # the second r = 64 call is the same specialization: recorded once
            module.qlora_linear(torch.randn(2, 64), weight, torch.randn(r, 64), torch.randn(40, r), 2.0)
        records = kernel_launches.recorded()
    finally:
        kernel_launches.install(None)
        sys.modules.pop(path.stem, None)
    assert [(r["kernel"], r["arguments"]["R_PAD"], r["calls"]) for r in records] == [
        ("qlora_forward_kernel", ["constexpr", 64], 2), ("qlora_forward_kernel", ["constexpr", 16], 1)]
    first = records[0]["arguments"]
    assert first["packed_ptr"][:2] == ["tensor", "uint8"] and first["M"] == ["int", 2] and first["scaling"][0] == "float"
    assert records[0]["file"] == str(path.resolve()) and records[0]["module"] == path.stem
    results = compile_launches(records[:1])
    assert [r["arch"] for r in results] == ["sm_90a", "sm_80"] and not any(r["error"] for r in results), results
    if not any(r["spill_bytes"] for r in results):
        pytest.skip("this Triton's ptxas does not spill this kernel at r = 64")
    hint = judge(results)
    assert hint.startswith("hint: qlora_forward_kernel compiles, and spills"), hint


def test_nothing_is_recorded_before_a_target_is_loaded_and_lora_labs_own_kernels_are_recorded_after():
    """A file that calls lora_lab's kernels is "not your code" before it runs (authorship.py); the suite's own tests of
    one-edit mistakes of the reference, and --solutions, compile lora_lab's kernels."""
    from lora_lab.kernels.nf4_dequantize import nf4_dequantize

    from lora_lab.nf4 import quantize_nf4

    q = quantize_nf4(torch.randn(8, 64), blocksize=64)
    kernel_launches.install(None)
    nf4_dequantize(q)
    assert kernel_launches.recorded() == []
    kernel_launches.install(Path(__file__).parent)  # a learner's folder: lora_lab's kernels are outside it, recorded too
    try:
        nf4_dequantize(q)
        assert [r["kernel"] for r in kernel_launches.recorded()] == ["nf4_dequantize_kernel"]
    finally:
        kernel_launches.install(None)


def _record(kernel: str, **constexprs) -> dict:
    return {"kernel": kernel, "file": "/x/ex.py", "module": "ex", "options": {}, "calls": 1,
            "arguments": {name: ["constexpr", value] for name, value in constexprs.items()}}


def test_choose_compiles_each_constexprs_extremes_first_and_every_kernel():
    launches = [_record("fwd", R_PAD=16), _record("fwd", R_PAD=32), _record("fwd", R_PAD=4), _record("fwd", R_PAD=64),
                _record("bwd", R_PAD=16)]
    chosen = choose(launches, per_kernel=2, most=3)
    assert [(r["kernel"], r["arguments"]["R_PAD"][1]) for r in chosen] == [("fwd", 4), ("bwd", 16), ("fwd", 64)]


def test_judge_fails_on_an_error_or_too_much_shared_memory_and_only_hints_at_spills():
    ok = {"kernel": "k", "file": "/x/ex.py", "arch": "sm_80", "error": "", "registers": 40, "spill_bytes": 0,
          "shared": 1024, "shared_limit": 2048, "line": 0}
    assert judge([ok]) == ""
    assert judge([ok | {"spill_bytes": 8}]).startswith("hint: k compiles, and spills 8 bytes")
    with pytest.raises(Exception, match="needs 4096 bytes of shared memory; the GPU has 2048"):
        judge([ok | {"shared": 4096}])
    with pytest.raises(Exception, match="ptxas fatal"):
        judge([ok | {"error": "PTXASError: ptxas fatal   : Unresolved extern function 'f'"}])


def test_trim_keeps_the_learners_line_the_caret_and_the_reason():
    error = ("CompilationError: at 3:8:\n    x = 1\n    y = tl.dot(a, b)\n        ^\n"
             "Input shapes should have M >= 1, N >= 1 and K >= 8")
    assert trim(error, "/x/ex08_triton_forward.py", 20) == (
        "ex08_triton_forward.py, line 22:\n    y = tl.dot(a, b)\n        ^\nInput shapes should have M >= 1, N >= 1 and K >= 8")


def test_a_compile_process_that_ends_without_answering_is_a_failure_not_a_hang():
    from lora_lab.conformance.errors import CheckFailed
    from lora_lab.conformance.grading.gpu_compile import Compiler

    compiler = Compiler()
    compiler.process.kill()  # as a crash of ptxas' caller would end it
    compiler.process.wait()
    try:
        with pytest.raises(CheckFailed, match=r"ended without a result \(exit status -9\)"):
            compiler.results([_record("k", BLOCK=16)])
    finally:
        compiler.close()
