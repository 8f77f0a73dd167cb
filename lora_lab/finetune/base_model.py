"""The model ``lora-lab train`` fine-tunes: the cached tiny Llama or a local checkpoint, made QLoRA.

``--bf16`` is the course's setup on one GPU: the parts QLoRA leaves dense
(embeddings, norms, lm_head) stored in bf16, the NF4 layers computing in bf16
(bitsandbytes' ``bnb_4bit_compute_dtype``), the adapters and AdamW's moments in
fp32. ``--gradient-checkpointing`` recomputes each decoder block in backward
(non-reentrant, PyTorch's recommendation; see ``lora_lab.model.enable_gradient_checkpointing``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from lora_lab.finetune.data_files import PromptCodec, UsageError


def build_model(settings: dict, ctx, say=print):
    """``(model, codec, base model path or None)``: the QLoRA model with fresh adapters (seeded) and its tokenizer."""
    import torch

    from lora_lab.finetune.checkpoint import load_llama, load_tokenizer
    from lora_lab.model import apply_qlora, enable_gradient_checkpointing
    from lora_lab.train import PRETRAIN_STEPS, pretrained_tiny_llama

    dtype = torch.bfloat16 if settings.get("bf16") else None
    lora = dict(target_modules=tuple(settings["targets"].split(",")), r=settings["r"], alpha=settings["alpha"],
                dropout=settings["dropout"], backend=settings["backend"], compute_dtype=dtype)
    try:
        if settings["model"] == "tiny":
            steps = PRETRAIN_STEPS if settings["pretrain_steps"] is None else settings["pretrain_steps"]
            with _main_rank_first(ctx):  # rank 0 pre-trains and caches the base model; the others then read the cache
                model, cache, cached = pretrained_tiny_llama(0, steps, progress=ctx is None or ctx.is_main)
            say(f"base model: tiny Llama pre-trained for {steps} steps ({'cached at' if cached else 'saved to'} {cache})")
            torch.manual_seed(settings["seed"])  # the adapters' random start
            model = apply_qlora(model.to(dtype) if dtype else model, **lora)  # adapters are made fp32 after the cast
            codec, path = PromptCodec(None, model.config.max_position_embeddings), None
        else:
            path = Path(settings["model"])
            if not path.is_dir():
                raise UsageError(f"--model expects 'tiny' or a local Hugging Face checkpoint directory; "
                                 f"{path} is not a directory")
            tokenizer = load_tokenizer(path)
            torch.manual_seed(settings["seed"])
            model = load_llama(path, dtype=dtype, **lora)
            say(f"base model: {path} ({model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}), "
                "every linear layer but lm_head in NF4, adapters on the targets")
            codec = PromptCodec(tokenizer, min(model.config.max_position_embeddings, 1024))
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from error
    if settings.get("gradient_checkpointing"):
        enable_gradient_checkpointing(model)
    if dtype or settings.get("gradient_checkpointing"):
        say(f"precision: {'bf16 base and compute, fp32 adapters' if dtype else 'fp32'}; gradient checkpointing "
            f"{'on' if settings.get('gradient_checkpointing') else 'off'}")
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
