"""More one-edit mistakes (issue #26): each one loses exactly the points of the check that names it.

The mistakes of test_grade.py are the first a learner makes; these are the ones that only sizes, dtypes and
behaviours the suite once never drew could show. Each is one edit of a correct exercise file written here with only
what its stub imports from lora_lab (a file that borrows more of the reference is not the learner's code).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_grade import assert_loses_exactly, run_grade, write_exercise

from lora_lab.conformance.grading.exercises import EXERCISES
from lora_lab.conformance.runner import ERROR, FAILED

MUTANTS = Path(__file__).resolve().parents[1] / "mutants"

NF4_BY_HAND = '''
import torch

from lora_lab.nf4 import NF4_CODE, NF4Tensor
from lora_lab.nf4 import quantize_nf4 as _reference_quantize

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_weight(weight, blocksize):
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"expected a tensor weight, got {type(weight).__name__}")
    if weight.dtype not in DTYPES:
        raise ValueError(f"expected a float32, float16 or bfloat16 weight, got {weight.dtype}")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"expected a power-of-two blocksize from 32 to 4096, got {blocksize}")
    if weight.numel() == 0:
        raise ValueError("expected a non-empty weight")
    if not torch.isfinite(weight).all():
        raise ValueError("expected a finite weight, it holds NaN or Inf")


def blockwise_absmax(flat, blocksize):
    blocks = -(-flat.numel() // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - flat.numel()))
    absmax = padded.view(blocks, blocksize).abs().amax(1)
    if flat.numel() % blocksize:
        absmax[-1] = absmax[-1].clamp(min=1e-38)
    return absmax


def normalize(flat, absmax, blocksize):
    full = flat.numel() - flat.numel() % blocksize
    divisor = absmax.clamp(min=1e-38)
    scaled = (flat[:full].view(-1, blocksize) * (1.0 / divisor[: full // blocksize, None])).reshape(-1)
    return torch.cat([scaled, flat[full:] / divisor[-1]]).clamp(-1, 1)


def nearest_codes(normalized):
    return torch.bucketize(normalized, (NF4_CODE[:-1] + NF4_CODE[1:]) / 2).to(torch.uint8)


def pack_codes(codes):
    if codes.numel() % 2:
        codes = torch.cat([codes, torch.tensor([7], dtype=torch.uint8)])
    return (codes[0::2] << 4) | codes[1::2]


def quantize_nf4(weight, blocksize=64, double_quant=False):
    check_weight(weight, blocksize)
    flat = weight.detach().reshape(-1).float()
    absmax = blockwise_absmax(flat, blocksize)
    codes = nearest_codes(normalize(flat, absmax, blocksize))
    q = NF4Tensor(pack_codes(codes), absmax, blocksize, weight.shape, weight.dtype)
    if double_quant:  # as the stub lends it: exercise 02 writes this part
        ref = _reference_quantize(weight, blocksize, double_quant=True)
        q = NF4Tensor(q.packed, ref.absmax, blocksize, weight.shape, weight.dtype, True,
                      ref.absmax_code, ref.absmax_scale, ref.absmax_offset)
    return q


def dequantize_nf4(q):
    codes = torch.stack([q.packed >> 4, q.packed & 0x0F], 1).reshape(-1)[: q.numel].long()
    blocks = torch.arange(q.numel) // q.blocksize
    return (NF4_CODE[codes] * q.absmax_fp32()[blocks]).to(q.dtype).reshape(q.shape)
'''

QLORA_BY_HAND = '''
import torch

from lora_lab.nf4 import NF4Tensor, dequantize_nf4  # noqa: F401


def check_operands(x, weight, lora_A, lora_B, bias):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("expected a floating-point tensor x")
    n_out, k_in = weight.shape
    if x.shape[-1] != k_in:
        raise ValueError(f"expected x of shape (..., {k_in}), got {tuple(x.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != k_in:
        raise ValueError(f"expected lora_A of shape (r, {k_in}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (n_out, lora_A.shape[0]):
        raise ValueError(f"expected lora_B of shape ({n_out}, {lora_A.shape[0]}), got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"expected bias of shape ({n_out},), got {tuple(bias.shape)}")


class FrozenBase(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return x @ dequantize_nf4(weight).to(x.dtype).t()

    @staticmethod
    def backward(ctx, dy):
        return dy @ dequantize_nf4(ctx.weight).to(dy.dtype), None


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    check_operands(x, weight, lora_A, lora_B, bias)
    y = FrozenBase.apply(x, weight) + (x @ lora_A.to(x.dtype).t()) @ lora_B.to(x.dtype).t() * scaling
    return y if bias is None else y + bias.to(x.dtype)
'''

TRAINING_BY_HAND = '''
from torch import nn

from lora_lab.lora import NF4Linear, QLoRALinear
from lora_lab.loss import next_token_loss

QUANTIZATION = ("blocksize", "double_quant", "compute_dtype")  # what NF4Linear.from_linear takes


def apply_qlora(model, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), r=8, alpha=16, dropout=0.0,
                **quant_kwargs):
    targets = {target_modules} if isinstance(target_modules, str) else set(target_modules)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(t for t in targets if not any(name.rsplit(".", 1)[-1] == t for name in linears))
    if missing:
        raise ValueError(f"target modules {missing} match no nn.Linear; the linear layers are {sorted(linears)}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    quantization = {k: v for k, v in quant_kwargs.items() if k in QUANTIZATION}
    for name, linear in linears.items():
        last = name.rsplit(".", 1)[-1]
        if last in targets:
            layer = QLoRALinear.from_linear(linear, r=r, alpha=alpha, dropout=dropout, **quant_kwargs)
        elif last != "lm_head":
            layer = NF4Linear.from_linear(linear, **quantization)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing if checkpointing is not None else getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()
    return model


def training_step(model, batch, optimizer):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = next_token_loss(out.logits, batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
'''


def edited(source: str, old: str, new: str, docstring: str) -> str:
    """``source`` with its one occurrence of ``old`` made ``new``, under a docstring that says what the mistake is."""
    assert source.count(old) == 1, f"{old!r} is not in the correct file once"
    return f'"""{docstring}"""\n' + source.replace(old, new)


CORRECT = {"ex01_nf4": NF4_BY_HAND, "ex03_qlora_linear": QLORA_BY_HAND, "ex06_training_step": TRAINING_BY_HAND}

MISTAKES = {
    "triton_forward_keeps_dense_w_for_backward": (  # lora_lab's fused kernel, and W dequantized into the graph
        "ex08_triton_forward",
        '''
        """The fused kernel's output, plus 0 * (x @ W^T) with W dequantized: right values, an N x K W kept for backward."""
        from lora_lab.kernels import fused_qlora_linear
        from lora_lab.nf4 import dequantize_nf4


        def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
            dense = dequantize_nf4(weight).to(x.dtype)
            return fused_qlora_linear(x, weight, lora_A, lora_B, scaling, bias) + 0 * (x @ dense.t())
        ''',
        {"memory.qlora_linear_keeps_no_dense_weight"},
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
    "kernel_loads_one_absmax_scale": (  # the learner's kernel of tests/mutants/, under Triton's interpreter
        "ex07_triton_dequant",
        (MUTANTS / "kernel_dequant_one_absmax_scale.py").read_text(),
        {"nf4.dequantize_matches_bitsandbytes", "nf4.dequantize_realistic_size"},  # past 256 blocks, both weights
    ),
    "nan_to_num_instead_of_the_absmax_floor": (
        "ex01_nf4",
        edited(NF4_BY_HAND, '''    divisor = absmax.clamp(min=1e-38)
    scaled = (flat[:full].view(-1, blocksize) * (1.0 / divisor[: full // blocksize, None])).reshape(-1)
    return torch.cat([scaled, flat[full:] / divisor[-1]]).clamp(-1, 1)''',
               '''    scaled = (flat[:full].view(-1, blocksize) * (1.0 / absmax[: full // blocksize, None])).reshape(-1)
    return torch.nan_to_num(torch.cat([scaled, flat[full:] / absmax[-1]])).clamp(-1, 1)''',
               "Repairs x * (1 / absmax) with nan_to_num instead of flooring absmax at 1e-38: a subnormal absmax gives +-1."),
        {"nf4.bytes_match_bitsandbytes"},
    ),
    "absmax_for_one_block_too_many": (
        "ex01_nf4",
        edited(NF4_BY_HAND, "    blocks = -(-flat.numel() // blocksize)", "    blocks = flat.numel() // blocksize + 1",
               "numel // blocksize + 1 blocks: a whole number of blocks stores one absmax too many (three for two)."),
        {"nf4.bytes_match_bitsandbytes", "nf4.round_trip_is_nearest_level", "nf4.zero_blocks_and_round_trip"},
    ),
    "dequantize_float32_block_index": (
        "ex01_nf4",
        edited(NF4_BY_HAND, "    blocks = torch.arange(q.numel) // q.blocksize",
               "    blocks = (torch.arange(q.numel, dtype=torch.float32) / q.blocksize).long().clamp(max=q.absmax.numel() - 1)",
               "Each element's block from a float32 index: exact below 2^24 elements, wrong past it."),
        {"nf4.dequantize_realistic_size"},
    ),
    "float64_weight_accepted": (
        "ex01_nf4",
        edited(NF4_BY_HAND, "    if weight.dtype not in DTYPES:", "    if not weight.is_floating_point():",
               "Validates the weight by is_floating_point(): a float64 weight is quantized instead of refused."),
        {"nf4.rejects_bad_input"},
    ),
    "bias_not_cast_to_x_dtype": (
        "ex03_qlora_linear",
        edited(QLORA_BY_HAND, "y + bias.to(x.dtype)", "y + bias",
               "Adds the bias as given: an fp32 bias beside bf16 activations promotes y to fp32 (the spec casts it)."),
        {"qlora.forward_matches_float64", "qlora.gradients_match_float64"},
    ),
    "weight_not_cast_to_x_dtype": (
        "ex03_qlora_linear",
        edited(QLORA_BY_HAND, "return x @ dequantize_nf4(weight).to(x.dtype).t()", "return x @ dequantize_nf4(weight).t()",
               "Multiplies by W in the dtype it was quantized from: beside activations of another dtype it cannot."),
        {"qlora.forward_matches_float64", "qlora.gradients_match_float64"},
    ),
    "qlora_by_plain_autograd": (
        "ex03_qlora_linear",
        edited(QLORA_BY_HAND, "FrozenBase.apply(x, weight)", "x @ dequantize_nf4(weight).to(x.dtype).t()",
               "Plain autograd through x @ W^T: right numbers, but the dequantized W is saved for backward."),
        {"memory.qlora_linear_keeps_no_dense_weight"},
    ),
    "apply_qlora_drops_use_rslora": (
        "ex06_training_step",
        edited(TRAINING_BY_HAND, "dropout=dropout, **quant_kwargs)",
               'dropout=dropout, **{k: v for k, v in quant_kwargs.items() if k != "use_rslora"})',
               "Drops use_rslora on the way to QLoRALinear: scaling alpha / r = 1 instead of alpha / sqrt(r) = 4."),
        {"training.matches_peft_bitsandbytes"},
    ),
    "apply_qlora_drops_backend": (
        "ex06_training_step",
        edited(TRAINING_BY_HAND, "dropout=dropout, **quant_kwargs)",
               'dropout=dropout, **{k: v for k, v in quant_kwargs.items() if k != "backend"})',
               "Drops backend on the way to QLoRALinear: backend='triton' silently runs the reference."),
        {"qlora.apply_rejects_unknown_target"},
    ),
    "nf4linear_without_compute_dtype": (
        "ex06_training_step",
        edited(TRAINING_BY_HAND, 'QUANTIZATION = ("blocksize", "double_quant", "compute_dtype")',
               'QUANTIZATION = ("blocksize", "double_quant")',
               "Passes NF4Linear only blocksize and double_quant: the MLP's layers ignore compute_dtype."),
        {"qlora.apply_compute_dtype_matches_bitsandbytes"},
    ),
    "adapters_in_the_models_dtype": (
        "ex06_training_step",
        edited(TRAINING_BY_HAND, "    checkpointing = getattr(model,", '''    dtype = model.lm_head.weight.dtype
    for module in model.modules():
        if isinstance(module, QLoRALinear):
            module.lora_A.data, module.lora_B.data = module.lora_A.data.to(dtype), module.lora_B.data.to(dtype)
    checkpointing = getattr(model,''', "Casts the adapters to the model's dtype: in a bf16 model most small updates round away."),
        {"qlora.apply_trains_only_adapters"},
    ),
    "next_token_loss_averaged_per_sequence": (  # exercise 04's own checks draw rows with different label counts
        "ex04_loss",
        '''
        """Averages each row's loss, then the rows (the authorship verdict is off here: the validation is lora_lab's)."""
        import torch.nn.functional as F

        from lora_lab.loss import check_loss_inputs


        def next_token_loss(logits, labels, ignore_index=-100):
            check_loss_inputs(logits, labels, ignore_index)
            targets = labels[:, 1:]
            per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=ignore_index,
                                        reduction="none")
            counts = (targets != ignore_index).sum(1)
            return (per_token.sum(1)[counts > 0] / counts[counts > 0]).mean()
        ''',
        {"loss.matches_shift_and_mask", "loss.matches_transformers"},
    ),
    "loss_averaged_per_sequence": (
        "ex06_training_step",
        edited(TRAINING_BY_HAND, '''    loss = next_token_loss(out.logits, batch["labels"])''',
               '''    labels = batch["labels"][:, 1:]
    logits = out.logits[:, :-1].float().transpose(1, 2)
    per_token = nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    loss = (per_token.sum(1) / (labels != -100).sum(1).clamp(min=1)).mean()''',
               "Averages each row's loss, then the rows: the mean over labels only when every row has one label."),
        {"training.matches_reference"},
    ),
}


@pytest.mark.parametrize("stem", sorted(CORRECT))
def test_the_correct_files_the_mistakes_edit_score_full_marks(tmp_path, stem):
    write_exercise(tmp_path, stem, CORRECT[stem])
    exercise = next(e for e in EXERCISES if e.stem == stem)
    (report,), output = run_grade(tmp_path, [exercise.id], authorship=True)  # the learner's own code, as graded
    assert report.score == report.total, output


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_mistake_loses_exactly_the_points_of_the_check_that_names_it(tmp_path, mistake):
    # A mistake that raises (x @ W^T across two dtypes) is an error; one that returns a wrong answer fails.
    assert_loses_exactly(tmp_path, *MISTAKES[mistake], statuses=(FAILED, ERROR))
