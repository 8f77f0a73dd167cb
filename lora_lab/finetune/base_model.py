"""The model ``lora-lab train`` fine-tunes: the cached tiny Llama or a local checkpoint, made QLoRA.

QLoRA starts from a pre-trained model. Ours is pre-trained here, briefly, on
shop listings ("... Sells for $54."): it learns the products and their prices,
but never sees the lecture's question. Fine-tuning (``lora-lab demo``,
``lora-lab train``) then teaches it to answer. The result is cached, keyed by
everything that shapes its weights, so only the first run pays for it.

``--bf16`` is the course's setup on one GPU: the parts QLoRA leaves dense
(embeddings, norms, lm_head) stored in bf16, the NF4 layers computing in bf16
(bitsandbytes' ``bnb_4bit_compute_dtype``), the adapters and AdamW's moments in
fp32. ``--gradient-checkpointing`` recomputes each decoder block in backward
(non-reentrant, PyTorch's recommendation; see ``lora_lab.model.enable_gradient_checkpointing``).

torch and the modules that need it are imported inside the functions: ``lora-lab
train`` imports this module before it checks its flags, and a mistyped flag must
be answered without the seconds torch takes to import.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lora_lab.finetune.data_files import PromptCodec, UsageError
from lora_lab.finetune.settings import TrainSettings

if TYPE_CHECKING:
    from torch import nn

# ---------------------------------------------------------------------------- pre-training the tiny base model

PRETRAIN_STEPS = 300
PRETRAIN_BATCH = 32
PRETRAIN_LR = 3e-3
PRETRAIN_WARMUP = 20


def cache_dir() -> Path:
    """``$LORA_LAB_CACHE``, else ``$XDG_CACHE_HOME/lora_lab``, else ``~/.cache/lora_lab``."""
    if os.environ.get("LORA_LAB_CACHE"):
        return Path(os.environ["LORA_LAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora_lab"


def _pretrain_key(seed: int, steps: int) -> str:
    """Changes whenever anything that shapes the pre-trained weights changes, so a stale cache is never used."""
    from lora_lab import data
    from lora_lab.model import PRESETS

    recipe = repr((PRESETS["tiny"], data.VOCABULARY, data.CATEGORIES, data.BRAND_TIERS, data.TEMPLATES, data.LISTING_PRICE_PREFIX,
                   seed, steps, PRETRAIN_BATCH, PRETRAIN_LR, PRETRAIN_WARMUP))
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def pretrain(model: nn.Module, steps: int = PRETRAIN_STEPS, seed: int = 0, progress: bool = False) -> list[float]:
    """Full fine-tuning (every weight, dense) on freshly generated listings, with warmup and linear decay."""
    import torch
    from tqdm.auto import tqdm

    from lora_lab import data
    from lora_lab.train import training_step

    if steps <= 0:
        return []
    products = data.generate_products(steps * PRETRAIN_BATCH, seed=10_000 + seed)  # never the demo's products
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / PRETRAIN_WARMUP) * max(0.05, 1 - s / steps)
    )
    model.train()
    losses = []
    for step in tqdm(range(steps), desc="pre-training the base model", disable=not progress, leave=False):
        batch = data.collate_listings(products[step * PRETRAIN_BATCH : (step + 1) * PRETRAIN_BATCH])
        losses.append(training_step(model, batch, optimizer))
        schedule.step()
    return losses


def pretrained_tiny_llama(seed: int = 0, steps: int = PRETRAIN_STEPS, progress: bool = False) -> tuple[nn.Module, Path, bool]:
    """The tiny base model after ``pretrain``, loaded from the cache when it is there.

    Returns ``(model, cache file, whether it came from the cache)``.
    """
    from safetensors.torch import load_file, save_file

    from lora_lab.model import tiny_llama

    model = tiny_llama(seed)
    path = cache_dir() / f"tiny-llama-base-{_pretrain_key(seed, steps)}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(path))
        return model, path, True
    pretrain(model, steps, seed, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, partial)
    os.replace(partial, path)  # atomic: a concurrent demo never reads half a file
    return model, path, False


# ---------------------------------------------------------------------------- made QLoRA for lora-lab train


def build_model(settings: TrainSettings, ctx, say=print):
    """``(model, codec, base model path or None)``: the QLoRA model with fresh adapters (seeded) and its tokenizer."""
    import torch

    from lora_lab.finetune.checkpoint import load_llama, load_tokenizer
    from lora_lab.model import apply_qlora, enable_gradient_checkpointing

    dtype = torch.bfloat16 if settings.bf16 else None
    lora = dict(target_modules=tuple(settings.targets.split(",")), r=settings.r, alpha=settings.alpha,
                dropout=settings.dropout, backend=settings.backend, compute_dtype=dtype)
    try:
        if settings.model == "tiny":
            steps = PRETRAIN_STEPS if settings.pretrain_steps is None else settings.pretrain_steps
            with _main_rank_first(ctx):  # rank 0 pre-trains and caches the base model; the others then read the cache
                model, cache, cached = pretrained_tiny_llama(0, steps, progress=ctx is None or ctx.is_main)
            say(f"base model: tiny Llama pre-trained for {steps} steps ({'cached at' if cached else 'saved to'} {cache})")
            torch.manual_seed(settings.seed)  # the adapters' random start
            model = apply_qlora(model.to(dtype) if dtype else model, **lora)  # adapters are made fp32 after the cast
            codec, path = PromptCodec(None, model.config.max_position_embeddings), None
        else:
            path = Path(settings.model)
            if not path.is_dir():
                raise UsageError(f"--model expects 'tiny' or a local Hugging Face checkpoint directory; "
                                 f"{path} is not a directory")
            tokenizer = load_tokenizer(path)
            torch.manual_seed(settings.seed)
            model = load_llama(path, dtype=dtype, **lora)
            say(f"base model: {path} ({model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}), "
                "every linear layer but lm_head in NF4, adapters on the targets")
            codec = PromptCodec(tokenizer, min(model.config.max_position_embeddings, 1024))
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from error
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if dtype or settings.gradient_checkpointing:
        say(f"precision: {'bf16 base and compute, fp32 adapters' if dtype else 'fp32'}; gradient checkpointing "
            f"{'on' if settings.gradient_checkpointing else 'off'}")
    return model, codec, None if path is None else str(path)


@contextlib.contextmanager
def _main_rank_first(ctx):
    import torch.distributed as dist

    parallel = ctx is not None and ctx.world_size > 1
    if parallel and not ctx.is_main:
        dist.barrier()
    yield
    if parallel and ctx.is_main:
        dist.barrier()
