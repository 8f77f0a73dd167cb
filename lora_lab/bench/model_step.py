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

    from lora_lab.conformance.judge.oracles import bnb_linear4bit
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


LLAMA3_VOCAB = 128_256  # Llama 3's tokenizer: 128,000 regular tokens and 256 special ones
VOCAB_BATCH, VOCAB_SEQUENCE = 16, 64


def full_logits_step(model: nn.Module, batch: dict, optimizer) -> float:
    """The step before "logits only where labels are": lm_head at every position, then the shifted loss."""
    from lora_lab.loss import next_token_loss

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = next_token_loss(logits, batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def large_vocab_records(timer: Timer, settings: Settings, repeats: int = 3) -> list[Record]:
    """A QLoRA step of the tiny Llama with Llama 3's 128,256-token vocabulary, batch 16 x sequence 64, one label a row.

    ``full logits`` computes lm_head at all 1,024 positions (and its gradient);
    ``labelled logits`` is lora_lab's ``training_step``, lm_head at the 16 that
    predict a label. Both start from the same adapters and take the same batch;
    their losses must agree, step by step.
    """
    from lora_lab.model import apply_qlora, tiny_llama
    from lora_lab.train import training_step

    g = torch.Generator().manual_seed(settings.seed)
    input_ids = torch.randint(4, LLAMA3_VOCAB, (VOCAB_BATCH, VOCAB_SEQUENCE), generator=g)
    labels = torch.full_like(input_ids, -100)
    labels[:, -1] = input_ids[:, -1]  # the price: the last token of each prompt
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    steps = {"full logits": full_logits_step, "labelled logits": training_step}
    models = {}
    for name in steps:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            model = apply_qlora(tiny_llama(settings.seed, vocab_size=LLAMA3_VOCAB)).train()
        models[name] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3))
    losses: dict[str, list[float]] = {name: [] for name in steps}
    run = lambda name: losses[name].append(steps[name](*models[name][:1], batch, models[name][1]))  # noqa: E731
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name in steps:
        run(name)  # warm-up
    for _ in range(settings.repeats or repeats):
        for name in steps:
            times[name].append(timer.time_call(lambda name=name: run(name)))
    peaks = {name: timer.peak_memory_mb(lambda name=name: run(name)) for name in steps}
    err = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(losses["labelled logits"], losses["full logits"]))
    correct = err <= MODEL_LOSS_TOLERANCE
    note = "" if correct else f"losses differ by {err:.3g} (relative), more than {MODEL_LOSS_TOLERANCE:g}"
    hidden = models["full logits"][0].config.hidden_size
    return [
        Record(op="step-vocab-128k", M=VOCAB_BATCH * VOCAB_SEQUENCE, N=LLAMA3_VOCAB, K=hidden, r=8, dtype="fp32", impl=name,
               ms=statistics.median(times[name]), tflops=0.0, gbps=0.0, peak_mem_mb=peaks[name], max_rel_err=err,
               scope="model", correct=correct, note=note)
        for name in steps
    ]
