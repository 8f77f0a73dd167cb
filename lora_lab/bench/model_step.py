"""The CPU benchmark's whole-model comparison: a training step of the tiny model, ours against peft + bitsandbytes.

A layer timing says nothing about the rest of a training step (the other
layers, the optimizer, Python overhead); this times the step itself on two
models holding the same NF4 numbers, and checks their losses agree.
"""

from __future__ import annotations

import statistics
import warnings

import torch
from torch import nn

from lora_lab.bench.timing import Record, Settings, Timer

MODEL_LOSS_TOLERANCE = 1e-4  # fp32, same NF4 numbers: only summation order differs between the two stacks


def tiny_model_pair(r: int = 8, alpha: float = 16, seed: int = 0):
    """lora_lab's QLoRA tiny Llama, and the same model as peft + bitsandbytes Linear4bit holding the same NF4 bytes.

    Both start from identical numbers: every linear layer but lm_head is NF4 in
    both (as in real QLoRA), the bitsandbytes layers wrap our NF4 weights without
    re-quantizing, and peft's adapters (on the targets only) are overwritten with ours.
    """
    import peft

    from lora_lab.conformance.oracles import bnb_linear4bit
    from lora_lab.lora import NF4Linear, QLoRALinear
    from lora_lab.model import DEFAULT_TARGETS, apply_qlora, tiny_llama

    ours = apply_qlora(tiny_llama(seed), DEFAULT_TARGETS, r=r, alpha=alpha)
    theirs = tiny_llama(seed)
    for name, layer in ours.named_modules():
        if isinstance(layer, NF4Linear):  # QLoRALinear too: the targets and the rest of the base alike
            parent, _, child = name.rpartition(".")
            setattr(theirs.get_submodule(parent), child, bnb_linear4bit(layer.weight, layer.bias))
    names = [name for name, module in ours.named_modules() if isinstance(module, QLoRALinear)]
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(DEFAULT_TARGETS), lora_dropout=0.0)
    theirs = peft.get_peft_model(theirs, config)
    with torch.no_grad():
        for name in names:
            mine, peft_layer = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(mine.lora_A)
            peft_layer.lora_B["default"].weight.copy_(mine.lora_B)
    return ours.train(), theirs.train()


def _linear_flops_per_token(model: nn.Module) -> int:
    """2 x (in x out) summed over the linear layers (adapters included): forward FLOPs per token, attention aside."""
    from lora_lab.lora import NF4Linear, QLoRALinear

    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, NF4Linear)):
            total += module.in_features * module.out_features
        if isinstance(module, QLoRALinear):
            total += module.r * (module.in_features + module.out_features)
    return 2 * total


def model_step_records(timer: Timer, settings: Settings, r: int = 8, alpha: float = 16, batch_size: int = 8):
    """Time ``training_step`` on both tiny models, alternating step by step; their losses must agree.

    Both take the same batch each step, so they train identically up to
    rounding; ``max_rel_err`` is the largest relative difference between their
    losses over every step, which shows they did the same work.
    """
    from lora_lab.data import collate, generate_products
    from lora_lab.train import training_step

    with warnings.catch_warnings():  # peft asks transformers about gradient checkpointing by a deprecated name
        warnings.simplefilter("ignore", FutureWarning)
        ours, theirs = tiny_model_pair(r, alpha, settings.seed)
    batch = collate(generate_products(batch_size, seed=settings.seed))
    models = {
        "reference": (ours, torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)),
        "bnb+peft": (theirs, torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-3)),
    }
    losses: dict[str, list[float]] = {name: [] for name in models}
    step = lambda name: losses[name].append(training_step(models[name][0], batch, models[name][1]))  # noqa: E731
    for name in models:  # warm-up, and an estimate of how many steps fit the budget
        step(name)
    estimate = sum(timer.time_call(lambda name=name: step(name)) for name in models)
    repeats = settings.repeats or int(min(30, max(settings.min_repeats, 30 * settings.budget_ms / max(estimate, 1e-3))))
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name in models:
            times[name].append(timer.time_call(lambda name=name: step(name)))
    peaks = {name: timer.peak_memory_mb(lambda name=name: step(name)) for name in models}
    err = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(losses["reference"], losses["bnb+peft"]))
    correct = err <= MODEL_LOSS_TOLERANCE
    tokens, hidden = batch["input_ids"].numel(), ours.config.hidden_size
    flops = 2 * tokens * _linear_flops_per_token(ours)  # forward + input gradients: twice the forward's linear FLOPs
    note = "" if correct else f"losses differ by {err:.3g} (relative), more than {MODEL_LOSS_TOLERANCE:g}"
    records = []
    for name in models:
        ms = statistics.median(times[name])
        records.append(Record(
            op="step", M=tokens, N=hidden, K=hidden, r=r, dtype="fp32", impl=name, ms=ms,
            tflops=flops / (ms * 1e-3) / 1e12, gbps=0.0, peak_mem_mb=peaks[name], max_rel_err=err,
            scope="model", correct=correct, note=note,
        ))
    return records
