"""Correct answers written differently from the reference score full marks, and the mistakes that only constructed
inputs or the new rules show lose exactly the points of the check that names them.

A suite that rejects valid code is as wrong as one that accepts broken code, so each
alternative here is a way a careful learner could well write it.
"""

from pathlib import Path

import pytest
from test_grade import CHECKS, run_grade, write_exercise

from lora_lab.conformance.grading.exercises import EXERCISES
from lora_lab.conformance.grading.feedback import NOT_YOURS
from lora_lab.conformance.runner import FAILED, PASSED

MUTANTS = Path(__file__).resolve().parents[1] / "mutants"
ONE_SCALE_KERNEL = (MUTANTS / "kernel_dequant_one_absmax_scale.py").read_text()

ALTERNATIVES = {
    # Exercise 07's stretch: double quantization decoded in the kernel, absmax_scale[block // 256] per block.
    "dequantize_kernel_decodes_double_quant": ("ex07_triton_dequant", ONE_SCALE_KERNEL.replace(
        "tl.load(scale_ptr)", "tl.load(scale_ptr + block // 256, mask=mask, other=0.0)")),
    "adamw_from_the_docstring_formulas": ("ex05_adamw", '''
        """AdamW exactly as the exercise's formulas read: m_hat, v_hat, then sqrt(v_hat) + eps."""
        import torch


        @torch.no_grad()
        def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
            if step < 1:
                raise ValueError(f"step counts from 1, got {step}")
            beta1, beta2 = betas
            exp_avg.copy_(beta1 * exp_avg + (1 - beta1) * grad)
            exp_avg_sq.copy_(beta2 * exp_avg_sq + (1 - beta2) * grad * grad)
            m_hat = exp_avg / (1 - beta1 ** step)
            v_hat = exp_avg_sq / (1 - beta2 ** step)
            param.copy_(param - lr * weight_decay * param)
            param.copy_(param - lr * m_hat / (torch.sqrt(v_hat) + eps))
        '''),
    "adamw_textbook_moments_mul_add": ("ex05_adamw", '''
        """The textbook moments, exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1), where torch's AdamW uses lerp_:
        a moment that nearly cancels rounds differently, by a few units of the terms that cancel."""
        import torch


        @torch.no_grad()
        def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
            if step < 1:
                raise ValueError(f"step counts from 1, got {step}")
            beta1, beta2 = betas
            param.mul_(1 - lr * weight_decay)
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denominator = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
            param.addcdiv_(exp_avg, denominator, value=-lr / (1 - beta1**step))
        '''),
    "loss_by_log_softmax_and_gather": ("ex04_loss", '''
        """Cross-entropy by hand: log_softmax in fp32, gather the next token's log-probability, mean over labels."""
        from lora_lab.loss import check_loss_inputs


        def next_token_loss(logits, labels, ignore_index=-100):
            check_loss_inputs(logits, labels, ignore_index)
            log_probs = logits[:, :-1].float().log_softmax(-1)
            targets = labels[:, 1:]
            keep = targets != ignore_index
            picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            return -(picked * keep).sum() / keep.sum()
        '''),
    "qlora_as_a_custom_autograd_function": ("ex03_qlora_linear", '''
        """qlora_linear as a torch.autograd.Function with a hand-written backward (the formulas of the hint)."""
        import torch

        from lora_lab.nf4 import dequantize_nf4
        from lora_lab.operands import check_qlora_operands


        class QLoRA(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, weight, lora_A, lora_B, scaling, bias):
                w = dequantize_nf4(weight).to(x.dtype)
                a, b = lora_A.to(x.dtype), lora_B.to(x.dtype)
                xa = x @ a.t()
                ctx.save_for_backward(x, a, b, xa)
                ctx.weight, ctx.scaling, ctx.dtypes = weight, scaling, (lora_A.dtype, lora_B.dtype)
                ctx.bias_dtype = None if bias is None else bias.dtype
                y = x @ w.t() + scaling * (xa @ b.t())
                return y if bias is None else y + bias.to(x.dtype)

            @staticmethod
            def backward(ctx, dy):
                x, a, b, xa = ctx.saved_tensors
                s, w = ctx.scaling, dequantize_nf4(ctx.weight).to(x.dtype)
                dyb = dy @ b
                dx = dy @ w + s * (dyb @ a)
                x2, dy2, dyb2, xa2 = (t.reshape(-1, t.shape[-1]) for t in (x, dy, dyb, xa))
                da = (s * dyb2.t() @ x2).to(ctx.dtypes[0])
                db = (s * dy2.t() @ xa2).to(ctx.dtypes[1])
                dbias = None if ctx.bias_dtype is None else dy2.sum(0).to(ctx.bias_dtype)
                return dx, None, da, db, None, dbias


        def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
            check_qlora_operands(x, weight, lora_A, lora_B, bias, scaling)
            return QLoRA.apply(x, weight, lora_A, lora_B, float(scaling), bias)
        '''),
}


@pytest.mark.parametrize("name", sorted(ALTERNATIVES))
def test_a_correct_alternative_scores_full_marks(tmp_path, name):
    stem, source = ALTERNATIVES[name]
    write_exercise(tmp_path, stem, source)
    exercise = next(e for e in EXERCISES if e.stem == stem)
    (report,), output = run_grade(tmp_path, [exercise.id])
    assert report.score == report.total, output


MISTAKES = {
    "exact_midpoint_takes_the_upper_level": (("ex01_nf4", '''
        """Nearest level with bucketize(..., right=True): on an exact midpoint it picks the upper level."""
        import torch

        from lora_lab.nf4 import NF4_CODE, NF4Tensor, check_weight, dequantize_nf4, quantize_absmax  # noqa: F401
        from lora_lab.nf4 import _nf4_absmax, _normalize_blocks


        def quantize_nf4(weight, blocksize=64, double_quant=False):
            check_weight(weight, blocksize)
            flat = weight.reshape(-1).float()
            absmax = _nf4_absmax(flat, blocksize)
            normalized = _normalize_blocks(flat, absmax, blocksize)
            normalized = torch.nn.functional.pad(normalized, (0, normalized.numel() % 2))
            codes = torch.bucketize(normalized, (NF4_CODE[:-1] + NF4_CODE[1:]) / 2, right=True).to(torch.uint8)
            packed = (codes[0::2] << 4) | codes[1::2]
            if not double_quant:
                return NF4Tensor(packed, absmax, blocksize, weight.shape, weight.dtype)
            codes, code, scales, offset = quantize_absmax(absmax)
            return NF4Tensor(packed, codes, blocksize, weight.shape, weight.dtype, True, code, scales, offset)
        '''), {"nf4.bytes_match_bitsandbytes": "bitsandbytes picks the lower one",
              # 17 million random weights hold a few exact midpoints too (3 of them: chance, not construction)
              "nf4.quantize_realistic_size": "past 2^24"}),
    "eps_inside_the_square_root": (("ex05_adamw", '''
        """sqrt(v_hat + eps) instead of sqrt(v_hat) + eps."""
        import torch


        @torch.no_grad()
        def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
            if step < 1:
                raise ValueError(f"step counts from 1, got {step}")
            exp_avg.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
            exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
            m_hat, v_hat = exp_avg / (1 - betas[0] ** step), exp_avg_sq / (1 - betas[1] ** step)
            param.mul_(1 - lr * weight_decay).sub_(lr * m_hat / (v_hat + eps).sqrt())
        '''), {"adamw.matches_torch": "already wrong with weight_decay=0, so not the weight decay",
               "adamw.first_step_moves_by_lr": "param after the first step"}),
}


@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_a_mistake_only_constructed_inputs_show_loses_the_points_that_name_it(tmp_path, name):
    (stem, source), caught = MISTAKES[name]
    write_exercise(tmp_path, stem, source)
    exercise = next(e for e in EXERCISES if e.stem == stem)
    (report,), output = run_grade(tmp_path, [exercise.id])
    statuses = {row.graded.check.name: row.status for row in report.rows}
    # The mistake is built on lora_lab's reference: the checks of the operations it imports unchanged are "not your code".
    assert {n for n, s in statuses.items() if s not in (PASSED, NOT_YOURS)} == set(caught), output
    for check_name, cause in caught.items():
        assert statuses[check_name] == FAILED and cause in output and CHECKS[check_name].hint in output, output
