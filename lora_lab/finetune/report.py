"""What a ``lora-lab train`` run leaves behind: the price evaluation, the charts, the metrics, the resume state.

The evaluation asks the model the lecture's question about held-out products
and reads its answer as the most likely token among "0" ... "999" right after
"Price is $" (one token per number, as in Llama 3): the mean error in dollars
and the share of prices within 20% of the truth say more about fine-tuning
than the loss does. The same prompts are scored before training and after.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lora_lab.finetune.data_files import PromptCodec, collate

EVAL_BATCH = 16


def evaluate(model, examples: list[tuple[list[int], int, float]], codec: PromptCodec, ctx, device) -> dict:
    """Held-out loss and price error. Each rank prices its share of the prompts; the results are gathered.

    The predicted price is the most likely token among "0" ... "999" at the
    position after "Price is $"; the loss is over the price's tokens.
    """
    import torch
    import torch.distributed as dist

    from lora_lab.train import forward_labelled

    world, rank = (ctx.world_size, ctx.rank) if ctx is not None else (1, 0)
    mine = examples[rank::world]
    predicted, loss_sum, tokens = [], 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(mine), EVAL_BATCH):
            rows = mine[start : start + EVAL_BATCH]
            batch = {k: v.to(device) for k, v in collate([(ids, n) for ids, n, _ in rows], codec.pad_id).items()}
            logits = forward_labelled(model, batch)  # (answer tokens, vocab): the rows of each prompt's answer, prompt by prompt
            targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
            scores = logits.float().log_softmax(-1)
            loss_sum -= float(scores.gather(-1, targets[:, None]).sum())
            tokens += len(targets)
            per_row = (batch["labels"][:, 1:] != -100).sum(1)
            first_answer_row = per_row.cumsum(0) - per_row  # the position after "$" predicts the answer's first token
            price_logits = logits[first_answer_row][:, codec.number_ids.to(device)]
            predicted += price_logits.argmax(-1).tolist()
    model.train(was_training)
    shares = [(predicted, [price for _, _, price in mine], loss_sum, tokens)]
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, (predicted, [price for _, _, price in mine], loss_sum, tokens))
    # rank r priced examples r, r + world, ...: interleave the shares back into the examples' order
    predicted = [shares[i % world][0][i // world] for i in range(len(examples))]
    true = [shares[i % world][1][i // world] for i in range(len(examples))]
    errors = [abs(p - t) for p, t in zip(predicted, true)]
    return {"mae": sum(errors) / len(errors), "within_20pct": sum(e <= 0.2 * t for e, t in zip(errors, true)) / len(errors),
            "loss": sum(s[2] for s in shares) / sum(s[3] for s in shares), "predicted": predicted, "true": true}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(history: dict, path: Path, title: str) -> None:
    """Training loss per step (and its running mean), held-out loss at each evaluation, learning rate on the right."""
    plt = _pyplot()
    losses = history["loss"]
    window = max(1, len(losses) // 10)
    mean = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
    figure, axes = plt.subplots(figsize=(8, 4.5))
    steps = range(1, len(losses) + 1)
    axes.plot(steps, losses, alpha=0.3, label="training batch")
    axes.plot(steps, mean, label=f"training, mean of the last {window}")
    evals = history["evals"]
    axes.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o--", label="held-out prompts")
    axes.set(xlabel="optimizer step", ylabel="price-token cross-entropy", title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    rate = axes.twinx()
    rate.plot(steps, history["lr"], color="gray", linewidth=0.8)
    rate.set_ylabel("learning rate", color="gray")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_prices(before: dict, after: dict | None, path: Path) -> None:
    """Predicted against true price on the held-out prompts, before and after fine-tuning, with the +-20% band."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 6))
    top = max([*before["true"], *before["predicted"], *(after["predicted"] if after else [])]) * 1.05 + 1
    axes.fill_between([0, top], [0, 0.8 * top], [0, 1.2 * top], color="green", alpha=0.08, label="within 20%")
    axes.plot([0, top], [0, top], color="green", linewidth=0.8)
    for result, name, color in ((before, "before", "gray"), (after, "after", "C0")):
        if result:
            axes.scatter(result["true"], result["predicted"], s=10, alpha=0.6, color=color,
                         label=f"{name}: mean error ${result['mae']:.0f}, {100 * result['within_20pct']:.0f}% within 20%")
    axes.set(xlim=(0, top), ylim=(0, top), xlabel="true price ($)", ylabel="predicted price ($)",
             title=f"{len(before['true'])} held-out prompts")
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def summarize(result: dict | None) -> dict | None:
    """The three numbers of an evaluation, without the per-prompt lists (for the console, the chart and metrics.json)."""
    return None if result is None else {k: result[k] for k in ("mae", "within_20pct", "loss")}


def save_run(out: Path, model, optimizer, scheduler, state: dict) -> None:
    """Adapter, resume state and metrics, each written whole (temporary name, then rename), then the charts."""
    import torch

    from lora_lab.finetune.adapters import save_adapter

    out.mkdir(parents=True, exist_ok=True)
    save_adapter(model, out / "adapter", base_model_name_or_path=state["base_model"], overwrite=True)
    resume = {**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    torch.save(resume, out / "resume.pt.tmp")
    os.replace(out / "resume.pt.tmp", out / "resume.pt")
    history = state["history"]
    metrics = {
        "settings": state["settings"], "steps_done": state["step"], "interrupted": state["interrupted"],
        "world_size": state["world_size"], "data": state["data"], "trainable": state["trainable"],
        "before": summarize(history["before"]), "after": summarize(history.get("after")), "evals": history["evals"],
        "train_loss": history["loss"], "lr": history["lr"], "seconds": state["seconds"],
        "held_out_prices": {"true": history["before"]["true"], "before": history["before"]["predicted"],
                            "after": (history.get("after") or {}).get("predicted")},
    }
    (out / "metrics.json.tmp").write_text(json.dumps(metrics, indent=1) + "\n")
    os.replace(out / "metrics.json.tmp", out / "metrics.json")
    if history["loss"]:  # the charts last: they are drawn from what is saved above
        plot_loss(history, out / "loss.png", f"QLoRA fine-tuning (r={state['settings']['r']}, lr={state['settings']['lr']:g})")
    plot_prices(history["before"], history.get("after"), out / "prices.png")

