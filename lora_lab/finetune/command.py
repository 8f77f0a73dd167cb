"""Fine-tune a model to price products with QLoRA, and show what it learned.

    lora-lab train                                      # the tiny pre-trained Llama, built-in products
    lora-lab train --data products.jsonl --steps 300 --out runs/mine
    lora-lab train --model /models/Llama-3.2-1B --preset course --data products.jsonl
    lora-lab train --resume runs/mine --steps 600       # continue a stopped (Ctrl-C) or finished run
    lora-lab train --nproc 2                            # the same run, data-parallel (torchrun, DDP)

A data file has one product per line, {"text": "<description>", "price": 249.0};
bad lines, a price above 999 included, are reported by number and skipped
(refused with --strict). Each
example is the lecture's prompt ("How much does this cost to the nearest
dollar? ... Price is $") and the whole-dollar price, the only labelled tokens.

Before and after training, held-out prompts are priced by the model's most
likely next token among the numbers 0-999 (one token each, as in Llama 3): mean
error in dollars, and the share within 20% of the true price.

--out gets: adapter/ (peft's format: PeftModel.from_pretrained loads it),
loss.png, prices.png (predicted vs true), metrics.json and resume.pt. Ctrl-C
finishes the current step and saves all of them (a second Ctrl-C stops at once,
still saving the last finished step); --resume continues from there, and refuses
a data file that changed since. --resume with a new --steps keeps the learning
rate where it was and decays it over the steps left: it never restarts from the
peak (lora_lab/finetune/schedule.py).
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lora_lab.cli.arguments import number, output_folder_problem, whole_number
from lora_lab.cli.threads import add_threads_argument, apply_threads
from lora_lab.finetune import schedule
from lora_lab.finetune.base_model import build_model
from lora_lab.finetune.data_files import UsageError, batch_rows, collate, data_digest, load_examples
from lora_lab.finetune.interrupts import InterruptGuard, stop_everywhere
from lora_lab.finetune.settings import PRESETS, TrainSettings

DEFAULT = TrainSettings.default
RESUMABLE = ("steps", "out", "backend")  # settings --resume may change; the rest must match the run being resumed
EVALUATIONS = 5  # held-out evaluations during training, besides before and after
# Each of a run's EVALUATIONS + 2 evaluations prices every held-out prompt: 100,000 of them kept a run at its last
# step for minutes. A data file's held-out rows are bounded by its own rows too (load_examples).
MAX_EVAL_SIZE = 2000
OUT_PURPOSE = "to write adapter/, loss.png, prices.png, metrics.json and resume.pt into"
POSITIVE, SHARE = number(0, open_low=True), number(0, 1, open_high=True)
EVAL_SIZE = whole_number(1, MAX_EVAL_SIZE, f"each of a run's {EVALUATIONS + 2} evaluations prices them all")

OPTIONS = (  # (flag, argparse keywords); defaults are None so that explicit flags can be told from the preset's
    ("--model", dict(metavar="tiny|PATH", help="'tiny' (the cached pre-trained tiny Llama) or a local Hugging Face Llama "
                     "directory with its tokenizer (default: tiny)")),
    ("--data", dict(metavar="builtin|FILE", help="'builtin' (synthetic products) or a JSONL file of {\"text\", \"price\"} rows")),
    ("--steps", dict(type=whole_number(1), help=f"optimizer steps (default: {DEFAULT('steps')})")),
    ("--batch-size", dict(type=whole_number(1), help="examples per micro-batch, split across --nproc processes "
                          f"(default: {DEFAULT('batch_size')})")),
    ("--grad-accum", dict(type=whole_number(1), help=f"micro-batches per optimizer step (default: {DEFAULT('grad_accum')})")),
    ("--r", dict(type=whole_number(1), help=f"LoRA rank (default: {DEFAULT('r')})")),
    ("--alpha", dict(type=POSITIVE, help=f"LoRA alpha; the update is scaled by alpha/r (default: {DEFAULT('alpha'):g})")),
    ("--dropout", dict(type=SHARE, help=f"dropout on the adapters' input (default: {DEFAULT('dropout'):g})")),
    ("--targets", dict(help=f"comma-separated linear layers to adapt (default: {DEFAULT('targets')})")),
    ("--lr", dict(type=POSITIVE, help=f"peak AdamW learning rate (default: {DEFAULT('lr'):g})")),
    ("--scheduler", dict(choices=("cosine", "constant", "linear"),
                         help=f"learning-rate decay after warmup (default: {DEFAULT('scheduler')})")),
    ("--warmup-ratio", dict(type=SHARE, help="share of the steps spent warming the learning rate up "
                            f"(default: {DEFAULT('warmup_ratio'):g})")),
    ("--backend", dict(choices=("reference", "triton"), help="QLoRA layer implementation; triton needs a CUDA GPU")),
    ("--bf16", dict(action="store_true", default=None, help="the base model in bf16 and the quantized layers computing in "
                    "bf16 (bnb_4bit_compute_dtype); the adapters and AdamW stay fp32")),
    ("--gradient-checkpointing", dict(action="store_true", default=None, help="recompute each decoder block in backward "
                                      "instead of keeping its activations (less memory, about a third more compute)")),
    ("--out", dict(help=f"output folder (default: {DEFAULT('out')})")),
    ("--seed", dict(type=int, help=f"seed for the adapters, the data order and the split (default: {DEFAULT('seed')})")),
    ("--eval-size", dict(type=EVAL_SIZE, help=f"held-out prompts for the price evaluation (default: {DEFAULT('eval_size')})")),
    ("--preset", dict(choices=tuple(PRESETS), help="course: r=32, alpha=64, q/k/v/o, dropout 0.1, lr 1e-4, cosine, "
                      "warmup 3%%")),
    ("--pretrain-steps", dict(type=whole_number(0), help="--model tiny only: pre-training steps of the cached base model")),
    ("--strict", dict(action="store_true", help="refuse a data file with any bad row (exit 2) instead of skipping them")),
    ("--overwrite", dict(action="store_true", help="write into a non-empty --out folder")),
    ("--resume", dict(metavar="DIR", help="continue the run saved in DIR (its settings; --steps may extend it)")),
    ("--nproc", dict(type=whole_number(1), help="data-parallel processes: re-launches itself under torchrun (default: 1)")),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, keywords in OPTIONS:
        parser.add_argument(flag, **keywords)
    add_threads_argument(parser)  # per process: each of --nproc N workers gets this many


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _explicit(args: argparse.Namespace) -> dict:
    return {key: value for key, value in vars(args).items() if key in TrainSettings.names() and value is not None}


# ---------------------------------------------------------------------------- settings and data


def resolve_settings(args: argparse.Namespace, saved: dict | None = None) -> TrainSettings:
    """Defaults, then the preset, then explicit flags; on --resume the saved run's settings, with explicit changes refused."""
    explicit = _explicit(args)
    if saved is not None:
        changed = {k: v for k, v in explicit.items() if k not in RESUMABLE and saved.get(k) != v}
        if changed:
            listed = ", ".join(f"--{k.replace('_', '-')} {v} (the run has {saved.get(k)})" for k, v in changed.items())
            raise UsageError(f"--resume keeps the run's settings; drop {listed}")
        settings = TrainSettings(**saved).replace(**{k: v for k, v in explicit.items() if k in RESUMABLE})
        return settings if "out" in explicit else settings.replace(out=args.resume)
    preset = TrainSettings.from_name(args.preset) if args.preset else TrainSettings()
    return preset.replace(**explicit)  # (argparse checked each flag's range)


# ---------------------------------------------------------------------------- one step, the schedule, the evaluation


def optimizer_step(
    model, micro_batches: list[dict], optimizer, world_size: int = 1, guard: InterruptGuard | None = None
) -> float:
    """One update from ``grad_accum`` micro-batches (this rank's shares); returns the step's loss, equal on all ranks.

    ``lora_lab.finetune.distributed.distributed_training_step`` weighs each micro-batch by
    its share of the step's labelled tokens, so the update is that of one batch
    holding everything; one micro-batch in one process is exactly ``training_step``.
    """
    from lora_lab.finetune.distributed import distributed_training_step

    def mark_updating() -> None:
        guard.updating = True  # cleared by the caller once the step is booked

    return distributed_training_step(model, micro_batches, optimizer, world_size, mark_updating if guard else None)


def _read_resume(directory: str) -> dict:
    import torch

    path = Path(directory) / "resume.pt"
    if not path.is_file() or not (Path(directory) / "adapter").is_dir():
        raise UsageError(f"--resume expects a folder written by lora-lab train (resume.pt and adapter/); {directory} has none")
    return torch.load(path, weights_only=True)


def _rng_state() -> dict:
    import torch

    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


# ---------------------------------------------------------------------------- the run


def train(args: argparse.Namespace, ctx) -> int:
    """The whole run in one process (or one torchrun worker: ``ctx`` from ``lora_lab.finetune.distributed.setup``)."""
    started = time.perf_counter()
    world, is_main = (ctx.world_size, ctx.is_main) if ctx is not None else (1, True)
    say = print if is_main else (lambda *a, **k: None)
    saved = _read_resume(args.resume) if args.resume else None
    settings = resolve_settings(args, saved["settings"] if saved else None)
    out, steps = Path(settings.out), settings.steps
    into_resumed = args.resume and out.resolve() == Path(args.resume).resolve()
    if out.is_dir() and any(out.iterdir()) and not (args.overwrite or into_resumed):
        raise UsageError(f"{out} already holds files; choose another --out, add --overwrite, or continue it with --resume {out}")
    if settings.batch_size < world:
        raise UsageError(f"--batch-size {settings.batch_size} is split across {world} processes; use at least {world}")
    # Only now torch: a mistyped flag or a full --out folder is answered without the seconds its import takes.
    import torch
    from tqdm.auto import tqdm

    from lora_lab.finetune.adapters import load_adapter
    from lora_lab.finetune.distributed import shard_batch, wrap_ddp
    from lora_lab.finetune.report import evaluate, save_run, summarize
    from lora_lab.model import trainable_summary
    from lora_lab.optim import AdamW

    apply_threads(args.threads)
    device = ctx.device if ctx is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if settings.backend == "triton" and device.type != "cuda":
        raise UsageError("--backend triton runs fused Triton kernels and needs a CUDA GPU; use --backend reference on a CPU")

    digest = None if settings.data == "builtin" else data_digest(settings.data)
    if saved and saved["data"].get("sha256", digest) != digest:
        raise UsageError(f"{settings.data} changed since the run in {args.resume} started: its rows decide the held-out "
                         "split and the batches, so the resumed run would train on other examples and compare against "
                         "other prompts; restore the file, or start a new run on it with --out")
    train_rows, held_rows = load_examples(settings, args.strict, say)
    model, codec, base_model = build_model(settings, ctx, say)
    model.to(device).train()
    examples = [codec.example(text, price) for text, price in train_rows]
    held_out = [(*codec.example(text, price), price) for text, price in held_rows]
    unknown = sum(ids.count(codec.unk_id) for ids, _ in examples) / max(1, sum(len(ids) for ids, _ in examples))
    if unknown > 0.02:
        say(f"warning: {unknown:.0%} of the training tokens are unknown to the tokenizer (the tiny model only knows the "
            "built-in products' words; use --model PATH for other text)")
    say(f"{trainable_summary(model)}; {len(examples)} training examples, {len(held_out)} held out")
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    kind = settings.scheduler
    if saved:  # (a run saved before schedules were kept had the plan of its own --steps)
        planned = saved.get("schedule") or schedule.plan(saved["settings"]["steps"], settings.warmup_ratio)
        segments = schedule.resumed(planned, saved["step"], steps, kind)
    else:
        segments = schedule.plan(steps, settings.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(schedule.multiplier, segments=segments, kind=kind))
    history, step = {"loss": [], "lr": [], "evals": [], "before": None}, 0
    if saved:
        load_adapter(model, Path(args.resume) / "adapter")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        for group in optimizer.param_groups:  # the rate of the next step under the (possibly extended) schedule
            group["lr"] = group["initial_lr"] * schedule.multiplier(saved["step"], segments, kind)
        torch.set_rng_state(saved["rng"]["cpu"])
        if saved["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        history, step = saved["history"], saved["step"]
        if step >= steps and "after" in history:  # (a run stopped during its final evaluation only needs that)
            raise UsageError(f"the run in {args.resume} already did {step} steps; pass --steps above {step} to continue it")
        history.pop("after", None)
        say(f"resuming {args.resume} at step {step} of {steps}")
        if len(segments) > len(planned):
            say(f"  --steps {steps} changes the run's end: the learning rate goes on from {optimizer.param_groups[0]['lr']:.2e} "
                f"and follows {kind} over the {steps - step} steps left (it never restarts; a new run gets a full schedule)")
    say(f"settings: r={settings.r} alpha={settings.alpha:g} dropout={settings.dropout:g} lr={settings.lr:g} "
        f"{kind} (warmup {segments[0]['warmup']} steps) targets {settings.targets}, batch {settings.batch_size} "
        f"x {settings.grad_accum} accumulated, {world} process(es) of {torch.get_num_threads()} CPU thread(s)")
    if history["before"] is None:
        history["before"] = evaluate(model, held_out, codec, ctx, device)
        history["evals"].append({"step": 0, **summarize(history["before"])})
    trained = wrap_ddp(model, ctx) if world > 1 else model
    every = max(1, steps // (EVALUATIONS + 1))
    rng, interrupted = _rng_state(), False
    bar = tqdm(total=steps, initial=step, desc="fine-tuning", unit="step", disable=not is_main)
    with InterruptGuard(say) as guard:
        try:
            while step < steps:
                micro_batches = []
                for micro in range(settings.grad_accum):
                    batch = collate([examples[i] for i in batch_rows(step, micro, settings, len(examples))], codec.pad_id)
                    batch = shard_batch(batch, ctx.rank, world) if world > 1 else batch
                    micro_batches.append({k: v.to(device) for k, v in batch.items()})
                loss = optimizer_step(trained, micro_batches, optimizer, world, guard)
                history["lr"].append(optimizer.param_groups[0]["lr"])
                scheduler.step()
                history["loss"].append(loss)
                step, rng, guard.updating = step + 1, _rng_state(), False
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{history['lr'][-1]:.2e}")
                if step % every == 0 and step < steps:
                    history["evals"].append({"step": step, **summarize(evaluate(model, held_out, codec, ctx, device))})
                if stop_everywhere(guard, ctx):
                    interrupted = True
                    break
            if not interrupted:
                after = evaluate(model, held_out, codec, ctx, device)
                history["after"] = after
                history["evals"].append({"step": step, **summarize(after)})
        except KeyboardInterrupt:
            interrupted = True
            optimizer.zero_grad(set_to_none=True)  # a half-accumulated step is dropped; the last finished one is saved
        guard.saving = True
        bar.close()
        if is_main:
            summary = trainable_summary(model)
            data = {"source": settings.data, "sha256": digest, "train_examples": len(examples), "held_out": len(held_out)}
            state = {"settings": settings.as_dict(), "step": step, "interrupted": interrupted, "world_size": world, "rng": rng,
                     "schedule": segments,
                     "history": history, "base_model": base_model, "data": data, "seconds": time.perf_counter() - started,
                     "trainable": {"parameters": summary.trainable, "share": summary.share}}
            save_run(out, model, optimizer, scheduler, state)
    before, after = history["before"], history.get("after")
    if interrupted:
        say(f"stopped at step {step} of {steps}; saved to {out}; continue with: lora-lab train --resume {out}")
        return 130
    say(f"held-out prices ({len(held_out)} prompts): mean error ${before['mae']:.1f} -> ${after['mae']:.1f}, within 20%: "
        f"{100 * before['within_20pct']:.0f}% -> {100 * after['within_20pct']:.0f}%, "
        f"loss {before['loss']:.3f} -> {after['loss']:.3f}")
    say(f"wrote {out}/adapter/, loss.png, prices.png, metrics.json, resume.pt ({time.perf_counter() - started:.0f} s)")
    return 0


def relaunch(args: argparse.Namespace) -> int:
    """``--nproc N``: run this same command under torchrun (without --nproc); its exit status is ours."""
    argv = []
    for flag, _ in OPTIONS:
        value = getattr(args, _dest(flag))
        if flag != "--nproc" and value is not None and value is not False:  # (0 is a value: --pretrain-steps 0)
            argv += [flag] if value is True else [flag, str(value)]
    argv += ["--threads", str(args.threads)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               "-m", "lora_lab.cli", "train", *argv]
    print("launching: " + shlex.join(command), flush=True)
    process = subprocess.Popen(command)
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:  # the workers got Ctrl-C too: wait while they save
            print("waiting for the workers to save ...", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    in_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    # --out, else the --resume'd folder, else the default: checked before any work, and before --nproc's workers start
    flag, out = ("--resume", args.resume) if args.out is None and args.resume else ("--out", args.out or DEFAULT("out"))
    problem = output_folder_problem(flag, out, OUT_PURPOSE)
    if problem:
        print(f"lora-lab train: {problem}", file=sys.stderr)
        return 2
    if (args.nproc or 1) > 1 and not in_torchrun:
        return relaunch(args)
    ctx = None
    try:
        if in_torchrun:
            from lora_lab.finetune.distributed import setup

            ctx = setup()
        return train(args, ctx)
    except UsageError as error:
        print(f"lora-lab train: {error}", file=sys.stderr)
        return 2
    finally:
        if ctx is not None:
            from lora_lab.finetune.distributed import teardown

            teardown()
