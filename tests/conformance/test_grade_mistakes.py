"""More one-edit mistakes (issue #26): each one loses exactly the points of the check that names it.

The mistakes of test_grade.py are the first a learner makes; these are the ones that only sizes, dtypes and
behaviours the suite once never drew could show. Each is built on lora_lab's reference with one change.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_grade import CHECKS, run_grade, write_exercise

from lora_lab.conformance.grading.exercises import EXERCISES
from lora_lab.conformance.runner import ERROR, FAILED, PASSED

MUTANTS = Path(__file__).resolve().parents[1] / "mutants"

MISTAKES = {
    "kernel_loads_one_absmax_scale": (  # the learner's kernel of tests/mutants/, under Triton's interpreter
        "ex07_triton_dequant",
        (MUTANTS / "kernel_dequant_one_absmax_scale.py").read_text(),
        {"nf4.dequantize_matches_bitsandbytes"},
    ),
    "adamw_without_no_grad": (
        "ex05_adamw",
        '''
        """The textbook update, but not under torch.no_grad(): a parameter that requires grad refuses in-place writes."""
        def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
            if step < 1:
                raise ValueError(f"step counts from 1, got {step}")
            beta1, beta2 = betas
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denominator = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
            param.mul_(1 - lr * weight_decay).addcdiv_(exp_avg, denominator, value=-lr / (1 - beta1**step))
        ''',
        {"adamw.matches_torch"},
    ),
    "bias_not_cast_to_x_dtype": (
        "ex03_qlora_linear",
        '''
        """Adds the bias as given: an fp32 bias beside bf16 activations promotes y to fp32 (the spec casts it first)."""
        from lora_lab.lora import base_path, lora_path
        from lora_lab.operands import check_qlora_operands


        def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
            check_qlora_operands(x, weight, lora_A, lora_B, bias)
            y = base_path(x, weight) + lora_path(x, lora_A, lora_B, scaling)
            return y if bias is None else y + bias
        ''',
        {"qlora.forward_matches_float64", "qlora.gradients_match_float64"},
    ),
    "weight_not_cast_to_x_dtype": (
        "ex03_qlora_linear",
        '''
        """Multiplies by W in the dtype it was quantized from: a weight from fp32 beside bf16 activations cannot multiply."""
        from lora_lab.lora import base_path, lora_path
        from lora_lab.operands import check_qlora_operands


        def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
            check_qlora_operands(x, weight, lora_A, lora_B, bias)
            if weight.dtype != x.dtype:
                raise TypeError(f"expected W in x's dtype {x.dtype}, got {weight.dtype}")
            return base_path(x, weight, bias) + lora_path(x, lora_A, lora_B, scaling)
        ''',
        {"qlora.forward_matches_float64", "qlora.gradients_match_float64"},
    ),
    "float64_weight_accepted": (
        "ex01_nf4",
        '''
        """Validates the weight by is_floating_point(): a float64 weight is quantized instead of refused."""
        import torch

        from lora_lab.nf4 import dequantize_nf4 as reference_dequantize
        from lora_lab.nf4 import quantize_nf4 as reference_quantize


        def quantize_nf4(weight, blocksize=64, double_quant=False):
            if isinstance(weight, torch.Tensor) and weight.dtype == torch.float64:
                weight = weight.float()
            return reference_quantize(weight, blocksize, double_quant)


        def dequantize_nf4(q):
            return reference_dequantize(q)
        ''',
        {"nf4.rejects_bad_input"},
    ),
    "qlora_by_plain_autograd": (
        "ex03_qlora_linear",
        '''
        """Plain autograd through x @ W^T: right numbers, but the dequantized W is saved for backward (the spec says no)."""
        from lora_lab.nf4 import dequantize_nf4
        from lora_lab.operands import check_qlora_operands


        def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
            check_qlora_operands(x, weight, lora_A, lora_B, bias)
            base = x @ dequantize_nf4(weight).to(x.dtype).t()
            y = base + (x @ lora_A.to(x.dtype).t()) @ lora_B.to(x.dtype).t() * scaling
            return y if bias is None else y + bias.to(x.dtype)
        ''',
        {"memory.qlora_linear_keeps_no_dense_weight"},
    ),
    "apply_qlora_drops_use_rslora": (
        "ex06_training_step",
        '''
        """Keeps only the quantization options of quant_kwargs: use_rslora is dropped silently (scaling 1, not 4)."""
        from lora_lab.model import apply_qlora as reference_apply
        from lora_lab.train import training_step as reference_step


        def apply_qlora(model, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), r=8, alpha=16, dropout=0.0,
                        **quant_kwargs):
            kept = {k: v for k, v in quant_kwargs.items() if k in ("blocksize", "double_quant", "compute_dtype")}
            return reference_apply(model, target_modules, r, alpha, dropout, **kept)


        def training_step(model, batch, optimizer):
            return reference_step(model, batch, optimizer)
        ''',
        {"training.matches_peft_bitsandbytes"},
    ),
    "adapters_in_the_models_dtype": (
        "ex06_training_step",
        '''
        """Casts the adapters to the model's dtype: in a bf16 model most of AdamW's small updates round away."""
        from lora_lab.lora import QLoRALinear
        from lora_lab.model import apply_qlora as reference_apply
        from lora_lab.train import training_step as reference_step


        def apply_qlora(model, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), r=8, alpha=16, dropout=0.0,
                        **quant_kwargs):
            dtype = next(model.parameters()).dtype
            reference_apply(model, target_modules, r, alpha, dropout, **quant_kwargs)
            for module in model.modules():
                if isinstance(module, QLoRALinear):
                    module.lora_A.data = module.lora_A.data.to(dtype)
                    module.lora_B.data = module.lora_B.data.to(dtype)
            return model


        def training_step(model, batch, optimizer):
            return reference_step(model, batch, optimizer)
        ''',
        {"qlora.apply_trains_only_adapters"},
    ),
    "nf4linear_without_compute_dtype": (
        "ex06_training_step",
        '''
        """Passes NF4Linear only blocksize and double_quant: the MLP's layers ignore compute_dtype (the spec says pass it)."""
        from lora_lab.lora import NF4Linear
        from lora_lab.model import apply_qlora as reference_apply
        from lora_lab.train import training_step as reference_step


        def apply_qlora(model, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), r=8, alpha=16, dropout=0.0,
                        **quant_kwargs):
            reference_apply(model, target_modules, r, alpha, dropout, **quant_kwargs)
            for module in model.modules():
                if type(module) is NF4Linear:
                    module.compute_dtype = None
            return model


        def training_step(model, batch, optimizer):
            return reference_step(model, batch, optimizer)
        ''',
        {"qlora.apply_compute_dtype_matches_bitsandbytes"},
    ),
    "nan_to_num_instead_of_the_absmax_floor": (
        "ex01_nf4",
        '''
        """Repairs x * (1 / absmax) with nan_to_num instead of flooring absmax at 1e-38: a subnormal absmax gives +-1."""
        import torch

        from lora_lab.nf4 import NF4_CODE, NF4Tensor, _nf4_absmax, check_weight, quantize_absmax
        from lora_lab.nf4 import dequantize_nf4 as reference_dequantize


        def dequantize_nf4(q):
            return reference_dequantize(q)


        def quantize_nf4(weight, blocksize=64, double_quant=False):
            check_weight(weight, blocksize)
            flat = weight.reshape(-1).float()
            absmax = _nf4_absmax(flat, blocksize)
            n = flat.numel()
            full = n - n % blocksize
            normalized = (flat[:full].view(-1, blocksize) * (1.0 / absmax[: full // blocksize, None])).reshape(-1)
            if full < n:
                normalized = torch.cat([normalized, flat[full:] / absmax[-1]])
            normalized = torch.nan_to_num(normalized).clamp(-1, 1)  # 0 * inf in a zero block is NaN: made 0 here
            normalized = torch.nn.functional.pad(normalized, (0, n % 2))
            codes = torch.bucketize(normalized, (NF4_CODE[:-1] + NF4_CODE[1:]) / 2).to(torch.uint8)
            packed = (codes[0::2] << 4) | codes[1::2]
            if not double_quant:
                return NF4Tensor(packed, absmax, blocksize, weight.shape, weight.dtype)
            codes, code, scales, offset = quantize_absmax(absmax)
            return NF4Tensor(packed, codes, blocksize, weight.shape, weight.dtype, True, code, scales, offset)
        ''',
        {"nf4.bytes_match_bitsandbytes"},
    ),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_mistake_loses_exactly_the_points_of_the_check_that_names_it(tmp_path, mistake):
    stem, source, caught = MISTAKES[mistake]
    assert caught <= set(CHECKS), f"unknown checks {sorted(caught - set(CHECKS))}: were they renamed?"
    write_exercise(tmp_path, stem, source)
    exercise = next(e for e in EXERCISES if e.stem == stem)
    (report,), output = run_grade(tmp_path, [exercise.id])
    lost = {row.graded.check.name for row in report.rows if row.status != PASSED}
    assert lost == caught, output
    # A mistake that raises (x @ W^T across two dtypes) is an error; one that returns a wrong answer fails.
    assert all(row.status in (FAILED, ERROR) for row in report.rows if row.graded.check.name in caught), output
    assert report.score == report.total - sum(row.graded.points for row in report.rows if row.graded.check.name in caught)
    for name in caught:
        assert CHECKS[name].hint in output, f"the hint of {name} is not shown"
