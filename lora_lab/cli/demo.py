"""The four steps of one QLoRA training step, shown on a tiny Llama in under a minute on a CPU.

    lora-lab demo                      # defaults: 40 training steps, r=8, alpha=16
    lora-lab demo --steps 80 --r 16 --out runs/demo16

The base model is a 2-layer Llama pre-trained here on synthetic shop listings
(cached after the first run). It is frozen in NF4 with LoRA adapters on the
attention projections, then walked through forward, loss, backward and
optimize on one product prompt, and finally fine-tuned for a few dozen steps,
with the loss chart written as a PNG.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lora_lab.cli.arguments import number, output_folder_problem, whole_number
from lora_lab.cli.threads import add_threads_argument, apply_threads

if TYPE_CHECKING:
    import torch

RULE_WIDTH = 72
BATCH_SIZE = 16
TRAINING_PRODUCTS = 128  # the fine-tuning set; the walk-through prompt is its first product
HELD_OUT = 256  # prompts never trained on, to measure the fine-tuning honestly


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=whole_number(0), default=40,
                        help="fine-tuning steps after the walk-through (default: 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the products, the adapters and the batches (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for loss.png (default: runs/demo)")
    parser.add_argument("--r", type=whole_number(1), default=8, help="LoRA rank (default: 8)")
    parser.add_argument("--alpha", type=number(0, open_low=True), default=16,
                        help="LoRA alpha; the update is scaled by alpha/r (default: 16)")
    parser.add_argument("--lr", type=number(0, open_low=True), default=2e-3,
                        help="AdamW learning rate for the adapters (default: 2e-3)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the loss chart")
    parser.add_argument(
        "--backend", choices=("reference", "triton"), default="reference",
        help="QLoRA layer: the readable PyTorch reference, or the fused Triton kernels (needs a CUDA GPU)",
    )
    parser.add_argument(
        "--pretrain-steps", type=whole_number(0), default=None,
        help="pre-training steps for the base model (default: lora_lab.finetune.base_model.PRETRAIN_STEPS; each value is cached "
        "separately under $LORA_LAB_CACHE or ~/.cache/lora_lab)",
    )
    add_threads_argument(parser)


def section(title: str, subtitle: str) -> None:
    print()
    print(f"== {title} " + "=" * max(0, RULE_WIDTH - len(title) - 4))
    print(f"   {subtitle}\n")


def indent(text: str, prefix: str = "  | ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _price_position(batch: dict[str, torch.Tensor]) -> int:
    """Index of the logits that predict the price: the position just before the (one) labelled token."""
    return int((batch["labels"][0] != -100).nonzero()[0, 0]) - 1


def evaluate(model, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Price loss, share of exactly right prices, and mean absolute error in dollars (argmax over prices only)."""
    import torch

    from lora_lab.data import FIRST_NUMBER_ID, LARGEST_SINGLE_TOKEN_NUMBER
    from lora_lab.train import compute_loss
    from lora_lab.train import forward_labelled as forward  # the rows the loss reads: one per price

    with torch.no_grad():
        logits = forward(model, batch)  # one row per price token: the positions after "Price is $"
    price_logits = logits[:, FIRST_NUMBER_ID : FIRST_NUMBER_ID + LARGEST_SINGLE_TOKEN_NUMBER + 1]
    guess = price_logits.argmax(-1)
    truth = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100] - FIRST_NUMBER_ID
    return {
        "loss": compute_loss(logits, batch["labels"]).item(),
        "exact": (guess == truth).float().mean().item(),
        "dollars_off": (guess - truth).abs().float().mean().item(),
    }


def step_forward(model, batch, product, tokenizer) -> torch.Tensor:
    from lora_lab.data import prompt
    from lora_lab.train import forward_labelled as forward  # the rows the loss reads: one per price

    section("1. FORWARD", "the model reads the prompt and scores every possible next token")
    print(indent(prompt(product.description)) + "   <- the model predicts the token that comes here\n")
    logits = forward(model, batch)
    probabilities = logits[0].float().softmax(-1)
    top = probabilities.topk(5)
    true_id = tokenizer.price_token_id(product.price)
    print(f"  logits: {tuple(logits.shape)} = (positions whose next token is labelled, vocabulary); lm_head runs at "
          f"{logits.shape[0]} of the prompt's {batch['input_ids'].shape[1]} positions, the only ones the loss reads")
    print(f"  true next token:      {tokenizer.token_text(true_id)!r:>8}  p = {probabilities[true_id].item():.3f}")
    print(f"  predicted next token: {tokenizer.token_text(int(top.indices[0]))!r:>8}  p = {top.values[0].item():.3f}")
    print("  top 5: " + ", ".join(f"{tokenizer.token_text(int(i))!r} {p:.3f}" for p, i in zip(top.values.tolist(), top.indices)))
    return logits


def step_loss(logits, batch, product) -> torch.Tensor:
    from lora_lab.train import compute_loss

    section("2. LOSS", "cross-entropy of the true next token: how surprised the model is by the real price")
    loss = compute_loss(logits, batch["labels"])
    labelled = int((batch["labels"] != -100).sum())
    print(f"  labels: {batch['labels'].shape[1]} positions, {labelled} labelled (the price); the rest are -100 and ignored")
    print(f"  loss = -log p('{product.price}') = {loss.item():.4f}   (a perfect model: 0; a uniform guess: "
          f"{math.log(logits.shape[-1]):.2f})")
    return loss


def step_backward(model, loss) -> None:
    from lora_lab.lora import QLoRALinear
    from lora_lab.train import backward

    section("3. BACKWARD", "gradients flow through the frozen NF4 weights into the adapters only")
    backward(loss)
    print(f"  {'layer':<32} {'|grad A|':>10} {'|grad B|':>10}")
    for name, module in model.named_modules():
        if isinstance(module, QLoRALinear):
            print(f"  {name:<32} {module.lora_A.grad.norm().item():>10.2e} {module.lora_B.grad.norm().item():>10.2e}")
    frozen = [p for p in model.parameters() if not p.requires_grad]
    with_grad = sum(p.grad is not None for p in frozen)
    print("  grad A is exactly 0 on this first step: it is multiplied by B, which starts at 0.")
    print(f"  base parameters with a gradient: {with_grad} of {len(frozen)} frozen tensors "
          f"({sum(p.numel() for p in frozen):,} numbers); the NF4 weights are not parameters at all")


def step_optimize(model, optimizer, batch) -> None:
    import torch

    from lora_lab.lora import QLoRALinear
    from lora_lab.train import compute_loss, optimize
    from lora_lab.train import forward_labelled as forward  # the rows the loss reads: one per price

    section("4. OPTIMIZE", "one AdamW step on the adapters (lora_lab.optim.AdamW), then the gradients are cleared")
    adapters = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    before_B = [m.lora_B.detach().clone() for m in adapters]
    with torch.no_grad():
        loss_before = compute_loss(forward(model, batch), batch["labels"]).item()
    optimize(optimizer)
    moved = max((m.lora_B - b).abs().max().item() for m, b in zip(adapters, before_B))
    with torch.no_grad():
        loss_after = compute_loss(forward(model, batch), batch["labels"]).item()
    print(f"  each element of B moved by at most {moved:.2e} (about lr = {optimizer.param_groups[0]['lr']:g}: "
          "Adam's first step is lr * sign(grad))")
    print(f"  gradients cleared: {all(p.grad is None for p in model.parameters())}")
    verdict = "lower" if loss_after < loss_before else "NOT lower"
    print(f"  loss on this prompt: {loss_before:.4f} -> {loss_after:.4f} ({verdict})")


def fine_tune(
    model, optimizer, products, steps: int, seed: int, held_out, device: str, base_loss: float
) -> tuple[list[float], dict[int, float]]:
    """``steps`` training steps on random batches; held-out loss every ``steps // 5`` steps.

    The chart's point at step 0 is ``base_loss``, the base model's held-out loss that the demo prints,
    measured before the walk-through's own AdamW step; step 1 is the first step after it.
    """
    from tqdm.auto import tqdm

    from lora_lab.data import collate
    from lora_lab.train import training_step

    rng = random.Random(seed)
    every = max(1, steps // 5)
    losses, held_out_losses = [], {0: base_loss}
    bar = tqdm(range(1, steps + 1), desc="fine-tuning", unit="step")
    for step in bar:
        batch = {k: v.to(device) for k, v in collate(rng.sample(products, BATCH_SIZE)).items()}
        losses.append(training_step(model, batch, optimizer))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % every == 0 or step == steps:
            held_out_losses[step] = evaluate(model, held_out)["loss"]
    return losses, held_out_losses


def plot(losses: list[float], held_out_losses: dict[int, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, len(losses) // 8)
    recent = [losses[max(0, i - window + 1) : i + 1] for i in range(len(losses))]
    figure, axes = plt.subplots(figsize=(7, 4))
    steps = range(1, len(losses) + 1)
    axes.plot(steps, losses, alpha=0.35, label="training batch")
    axes.plot(steps, [sum(r) / len(r) for r in recent], label=f"training, mean of the last {window}")
    axes.plot(list(held_out_losses), list(held_out_losses.values()), "o--", label=f"{HELD_OUT} held-out prompts")
    axes.set(xlabel="fine-tuning step (0: the base model, before the walk-through step)",
             ylabel="price-token cross-entropy", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(args: argparse.Namespace) -> int:
    problem = None if args.no_plot else output_folder_problem("--out", args.out, "to write loss.png into")
    if problem:  # before the minute of work whose chart it would lose
        print(f"lora-lab demo: {problem}", file=sys.stderr)
        return 2
    import torch

    from lora_lab.data import collate, generate_products, get_tokenizer
    from lora_lab.finetune.base_model import PRETRAIN_STEPS, pretrained_tiny_llama
    from lora_lab.model import apply_qlora, trainable_summary
    from lora_lab.optim import AdamW

    if args.backend == "triton" and not torch.cuda.is_available():
        print("lora-lab demo: --backend triton runs fused Triton kernels and needs a CUDA GPU; use --backend reference on a CPU",
              file=sys.stderr)
        return 2
    apply_threads(args.threads)
    device = "cuda" if args.backend == "triton" else "cpu"
    started = time.perf_counter()
    tokenizer = get_tokenizer()
    print("lora-lab demo: one QLoRA training step, in the lecture's four steps")

    pretrain_steps = PRETRAIN_STEPS if args.pretrain_steps is None else args.pretrain_steps
    model, cache_file, cached = pretrained_tiny_llama(0, pretrain_steps, progress=True)  # one base model for every --seed
    config = model.config
    print(f"\nbase model: Llama, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads} heads ({config.num_key_value_heads} key/value), vocabulary {config.vocab_size}")
    print(f"  pre-trained for {pretrain_steps} steps on shop listings ('... Sells for $54.'); "
          f"{'loaded from' if cached else 'saved to'} {cache_file}")
    torch.manual_seed(args.seed)  # the adapters' random initialisation
    apply_qlora(model, r=args.r, alpha=args.alpha, backend=args.backend)
    model.to(device).train()
    print(f"  QLoRA: every linear layer but lm_head frozen in NF4 (double quant); LoRA r={args.r}, alpha={args.alpha:g} "
          "on q/k/v/o")
    print(f"  {trainable_summary(model)}")

    products = generate_products(TRAINING_PRODUCTS, seed=args.seed + 1)
    held_out = {k: v.to(device) for k, v in collate(generate_products(HELD_OUT, seed=args.seed + 2)).items()}
    product = products[0]
    batch = {k: v.to(device) for k, v in collate([product]).items()}
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    before = evaluate(model, held_out)  # fresh adapters (B = 0): this is the base model's NF4 quality

    logits = step_forward(model, batch, product, tokenizer)
    loss = step_loss(logits, batch, product)
    step_backward(model, loss)
    step_optimize(model, optimizer, batch)

    section("FINE-TUNING", f"the four steps again, {args.steps} times, on batches of {BATCH_SIZE} from {len(products)} products")
    losses, held_out_losses = fine_tune(model, optimizer, products, args.steps, args.seed, held_out, device, before["loss"])
    after = evaluate(model, held_out)
    if losses:
        k = max(1, min(5, len(losses) // 2))
        print(f"  training loss, mean of {k} steps: first {sum(losses[:k]) / k:.3f} -> last {sum(losses[-k:]) / k:.3f}")
    print(f"  on {HELD_OUT} held-out prompts, base model -> now: loss {before['loss']:.3f} -> {after['loss']:.3f}, "
          f"exact price {100 * before['exact']:.1f}% -> {100 * after['exact']:.1f}%, "
          f"mean error ${before['dollars_off']:.0f} -> ${after['dollars_off']:.0f}")
    with torch.no_grad():
        guess = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, _price_position(batch)]
    print(f"  the walk-through prompt now: predicted {tokenizer.token_text(int(guess.argmax()))!r}, true '{product.price}'")
    if not args.no_plot and losses:
        chart = args.out / "loss.png"
        title = f"QLoRA fine-tuning of the tiny Llama (r={args.r}, alpha={args.alpha:g}, lr={args.lr:g})"
        plot(losses, held_out_losses, chart, title)
        print(f"\nloss chart: {chart}")
    print(f"done in {time.perf_counter() - started:.1f} s ({torch.get_num_threads()} CPU thread(s); see --threads)")
    return 0
