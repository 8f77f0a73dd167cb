"""``lora-lab grade --chain`` (a learner's earlier bugs show downstream) and ``--watch`` (grade again on every save)."""

import io
import textwrap

from test_grade import MISTAKES, run_grade, write_exercise

from lora_lab.conformance.grading.command import watch_exercise
from lora_lab.conformance.grading.grade import grade
from lora_lab.conformance.runner import FAILED, PASSED

OWN_DOUBLE_QUANT = '''
    """Exercise 02 as the file ships it: single quantization imported from the reference."""
    from lora_lab.nf4 import NF4Tensor, quantize_absmax
    from lora_lab.nf4 import quantize_nf4 as quantize_single


    def quantize_nf4(weight, blocksize=64, double_quant=True):
        q = quantize_single(weight, blocksize)
        if not double_quant:
            return q
        codes, code, scales, offset = quantize_absmax(q.absmax)
        return NF4Tensor(q.packed, codes, blocksize, q.shape, q.dtype, True, code, scales, offset)
    '''


def test_chain_grades_exercise_02_with_the_learners_own_exercise_01(tmp_path):
    stem, low_nibble_first, _ = MISTAKES["low_nibble_first"]
    write_exercise(tmp_path, stem, low_nibble_first)
    write_exercise(tmp_path, "ex02_double_quant", OWN_DOUBLE_QUANT)
    (plain,), _ = run_grade(tmp_path, ["02"])
    assert plain.score == plain.total and not plain.chained
    out = io.StringIO()
    (chained,) = grade(tmp_path, ["02"], stream=out, chain=True, authorship=False)
    statuses = {row.graded.check.name: row.status for row in chained.rows}
    assert statuses["nf4.double_quant_codes"] == FAILED, out.getvalue()  # the packed bytes come from the learner's 01
    assert statuses["nf4.double_quant_offset"] == statuses["nf4.double_quant_scales"] == PASSED, out.getvalue()
    assert chained.chained == ["quantize_single -> your ex01_nf4.quantize_nf4"]
    assert "with --chain: quantize_single -> your ex01_nf4.quantize_nf4" in out.getvalue()


def test_chain_keeps_the_reference_when_the_earlier_file_is_missing(tmp_path):
    write_exercise(tmp_path, "ex02_double_quant", OWN_DOUBLE_QUANT)
    (report,) = grade(tmp_path, ["02"], stream=io.StringIO(), chain=True, authorship=False)
    assert report.score == report.total
    assert report.chained == ["quantize_single: no ex01_nf4.py here, so the reference's"]


def test_watch_shows_the_whole_table_first_then_only_what_changed(tmp_path):
    stem, no_shift, caught = MISTAKES["loss_without_the_shift"]
    right = '''
        """The reference's loss, called from a function of the file (a bare re-export would be "not your code")."""
        from lora_lab.loss import next_token_loss as reference


        def next_token_loss(logits, labels, ignore_index=-100):
            return reference(logits, labels, ignore_index)
        '''
    path = write_exercise(tmp_path, stem, right)
    saves = iter([textwrap.dedent(no_shift), textwrap.dedent(no_shift) + "\n# a comment\n"])

    def save_next(_seconds):  # the learner saves a new version while the watch waits
        path.write_text(next(saves))

    out = io.StringIO()
    assert watch_exercise(tmp_path, "04", "ci", False, stream=out, authorship=False, runs=3, wait=save_next) == 0
    first, second, third = out.getvalue().split("\n[")[0], *out.getvalue().split("\n[")[1:]
    assert "passed        loss.matches_shift_and_mask" in first and "loss.rejects_bad_input" in first
    assert "changed since the last run (19 -> 3/19)" in second
    assert all(name in second for name in caught) and "loss.rejects_bad_input" not in second, second
    assert "no check changed: 3/19" in third


def test_an_error_row_ending_one_exercise_leaves_the_next_exercises_scores_intact(tmp_path):
    """After an error row the target's process is restarted without waiting; the next exercise's file once read that
    restart's reply (the previous file's) as its own, and every later exercise was graded as defining nothing."""
    write_exercise(tmp_path, "ex03_qlora_linear", '''
        def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
            raise RuntimeError("every call fails, so the exercise's last row is an error")
        ''')
    write_exercise(tmp_path, "ex04_loss", '''
        import torch
        import torch.nn.functional as F


        def next_token_loss(logits, labels, ignore_index=-100):
            if logits.dim() != 3 or labels.shape != logits.shape[:2]:
                raise ValueError(f"expected logits (batch, seq, vocab) and labels (batch, seq), got {tuple(logits.shape)}"
                                 f" and {tuple(labels.shape)}")
            targets = labels[:, 1:]
            if not (targets != ignore_index).any():
                raise ValueError("no labelled token follows a position: nothing to predict")
            scores = logits[:, :-1].float()
            return F.cross_entropy(scores.reshape(-1, scores.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)
        ''')
    (errors, loss), table = run_grade(tmp_path, ["03", "04"])
    assert errors.rows[-1].status == "error", table
    assert loss.score == loss.total, table
