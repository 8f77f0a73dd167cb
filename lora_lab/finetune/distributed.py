"""The QLoRA step on PyTorch's own distributed engine: DDP, and FSDP2 for scale.

Data parallelism splits a global batch across ranks; each rank runs the four
steps on its share, and the gradients are averaged before the optimizer step,
so every rank applies the same update. For QLoRA only the adapters have
gradients, so only they travel:

- **The frozen NF4 base is replicated, never all-reduced.** ``NF4Linear`` and
  ``QLoRALinear`` keep their NF4 weight as a plain attribute, not a Parameter or buffer, so
  neither DDP nor FSDP2 sees it; every rank builds the same model from the same
  seed (or checkpoint) and quantizes it identically. The dense frozen tensors
  (embeddings, norms, lm_head) have ``requires_grad=False``: DDP never reduces
  them either.
- **DDP** (``wrap_ddp``) all-reduces the adapter gradients: r·(K+N) numbers
  per layer instead of N·K.
- **FSDP2** (``shard_fsdp2``, ``torch.distributed.fsdp.fully_shard``) shards
  every Parameter, adapters and frozen dense tensors alike, across ranks; the
  optimizer then holds only its shard of the AdamW moments. The NF4 weights
  stay whole on every rank (they are not Parameters): at 4 bits they are
  already the small part, and sharding them would need a quantized storage
  dtype that FSDP2 cannot all-gather as-is. ``memory_per_rank`` reports it.

**Equal to one process.** The loss is a mean over the labelled tokens of the
*global* batch. Each rank's loss is a mean over its own labelled tokens, and
DDP averages gradients over ranks, so a naive split is only right when every
rank holds the same number of labelled tokens. ``distributed_training_step``
weighs each rank's loss by its share of the global token count, which makes
the averaged gradient exactly the single-process gradient (up to the order of
floating-point sums).

Launch with torchrun (gloo on CPU, NCCL on GPU)::

    torchrun --standalone --nproc-per-node 2 -m lora_lab.finetune.distributed check          # DDP
    torchrun --standalone --nproc-per-node 2 -m lora_lab.finetune.distributed check --fsdp   # FSDP2

Only rank 0 prints and writes files. If any rank raises, torchrun stops the
others and exits non-zero; collectives carry a timeout so no rank waits forever.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("LORA_LAB_DIST_TIMEOUT", "120")))


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> Context:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR... in the environment)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "expected to be launched by torchrun (RANK and WORLD_SIZE unset); "
            "try: torchrun --standalone --nproc-per-node 2 -m lora_lab.finetune.distributed check"
        )
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return Context(dist.get_rank(), dist.get_world_size(), device, backend)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_batch(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's contiguous slice of the rows of an already collated (and padded) global batch.

    Splitting after collation keeps padding identical to the single-process
    batch. Every rank must get at least one row.
    """
    rows = batch["input_ids"].shape[0]
    if rows < world_size:
        raise ValueError(f"expected at least one row per rank: {rows} rows for {world_size} ranks")
    bounds = [rows * i // world_size for i in range(world_size + 1)]
    return {key: value[bounds[rank] : bounds[rank + 1]] for key, value in batch.items()}


def wrap_ddp(model: nn.Module, ctx: Context) -> nn.Module:
    """DistributedDataParallel over the trainable parameters (the adapters); frozen ones are never reduced."""
    from torch.nn.parallel import DistributedDataParallel

    model.to(ctx.device)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def shard_fsdp2(model: nn.Module, ctx: Context) -> nn.Module:
    """FSDP2: each decoder layer is its own shard group, then the root; NF4 weights stay replicated."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(ctx.device)
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for layer in getattr(getattr(model, "model", model), "layers", []):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def distributed_training_step(
    model: nn.Module,
    batches: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    world_size: int | None = None,
    before_update: Callable[[], None] | None = None,
) -> float:
    """The four steps on this rank's share (one batch, or micro-batches to accumulate); returns the *global*
    pre-update loss, the same on every rank.

    Each (micro-)batch loss is a mean over its own labelled tokens. Multiplying it by
    ``world_size * its_count / global_count`` turns gradient accumulation and DDP's
    (and FSDP2's) average of gradients into the gradient of the global mean. One
    batch in one process is exactly ``training_step``. ``before_update`` runs just
    before the optimizer step (``lora-lab train`` uses it to make Ctrl-C wait for it).
    """
    from lora_lab.train import backward, compute_loss, forward_labelled, optimize

    micro_batches = [batches] if isinstance(batches, dict) else list(batches)
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    counts = [(batch["labels"][:, 1:] != -100).sum().double() for batch in micro_batches]
    total = torch.stack(counts).sum()
    if world_size > 1:
        dist.all_reduce(total)
    loss_sum = torch.zeros((), dtype=torch.float64, device=total.device)
    for i, batch in enumerate(micro_batches):
        accumulate_only = i < len(micro_batches) - 1 and hasattr(model, "no_sync")
        with model.no_sync() if accumulate_only else contextlib.nullcontext():
            loss = compute_loss(forward_labelled(model, batch), batch["labels"])
            weight = world_size * counts[i] / total
            backward(loss if weight == 1 else loss * weight.to(loss.dtype))
        loss_sum += loss.detach().double() * counts[i]
    if before_update is not None:
        before_update()
    optimize(optimizer)
    if world_size > 1:
        dist.all_reduce(loss_sum)
    return float(loss_sum / total)


def adapter_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) copies of the trainable parameters, keyed without DDP's ``module.`` prefix."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.removeprefix("module.")] = full.detach().cpu().clone()
    return out


def memory_per_rank(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds: its shard of the parameters, of the AdamW moments, and the replicated NF4 weights."""
    from lora_lab.lora import NF4Linear

    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    params = sum(local(p).numel() * p.element_size() for p in model.parameters())
    moments = sum(
        local(v).numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    nf4 = sum(m.weight.nbytes for m in model.modules() if isinstance(m, NF4Linear))  # QLoRALinear's too
    return {"parameters": params, "adam_moments": moments, "nf4_replicated": nf4}


# ---------------------------------------------------------------------------- the self-check


def _build(seed: int):
    from lora_lab import data
    from lora_lab.model import apply_qlora, tiny_llama

    torch.manual_seed(seed)
    model = apply_qlora(tiny_llama(seed), r=8, alpha=16)
    with torch.no_grad():  # non-zero B so that A's gradient is non-zero too
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.02, generator=torch.Generator().manual_seed(seed + len(name)))
    batch = data.collate(data.generate_products(6, seed=seed))
    return model, batch


LR, EPS = 1e-2, 1e-8
UNIT_ROUNDOFF_FP32 = 2.0**-24


def _single_process_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """The reference: the four steps on the whole batch in one process; returns (loss, gradients)."""
    from lora_lab.train import backward, compute_loss, forward_labelled, optimize

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, eps=EPS)
    loss = compute_loss(forward_labelled(model, batch), batch["labels"])
    backward(loss)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimize(optimizer)
    return loss.item(), grads


def step_tolerance(grad: torch.Tensor, param: torch.Tensor, reduction: int) -> torch.Tensor:
    """How far one AdamW step may move apart when the gradient is summed in another order.

    A first AdamW step moves each element by ``lr * g / (|g| + eps)``; a change
    ``dg`` of the gradient changes that by at most ``lr * eps * dg / (|g| + eps)^2``
    (and never by more than 2 lr). Summing ``reduction`` terms in another order
    changes g by at most ``sqrt(reduction) * u * max|g|`` (norm-wise). Computing
    the update itself rounds about four times (bias corrections, sqrt, +eps,
    divide) on a value of size at most lr, on each side: ``8u·lr``; storing the
    new parameter adds ``2u|p|``.
    """
    dg = reduction**0.5 * UNIT_ROUNDOFF_FP32 * grad.abs().max()
    moved = LR * EPS * dg / (grad.abs() + EPS) ** 2
    return torch.clamp(moved, max=2 * LR) + 8 * UNIT_ROUNDOFF_FP32 * LR + 2 * UNIT_ROUNDOFF_FP32 * param.abs()


def check(args: argparse.Namespace) -> int:
    """One distributed step vs one single-process step on the whole batch, run inside each rank."""
    ctx = setup()
    if args.fail_rank is not None and ctx.rank == args.fail_rank:
        raise RuntimeError(f"rank {ctx.rank} failing on purpose (--fail-rank)")
    reference, batch = _build(args.seed)
    is_nf4 = lambda m: hasattr(getattr(m, "weight", None), "packed")  # noqa: E731  (targets and the rest of the base)
    nf4_before = {n: m.weight.packed.clone() for n, m in reference.named_modules() if is_nf4(m)}
    frozen_before = {n: p.detach().clone() for n, p in reference.named_parameters() if not p.requires_grad}
    single_loss, grads = _single_process_step(reference, batch)

    model, _ = _build(args.seed)
    wrapped = shard_fsdp2(model, ctx) if args.fsdp else wrap_ddp(model, ctx)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=LR, eps=EPS)
    local_batch = {k: v.to(ctx.device) for k, v in shard_batch(batch, ctx.rank, ctx.world_size).items()}
    dist_loss = distributed_training_step(wrapped, local_batch, optimizer)

    expected, got = adapter_parameters(reference), adapter_parameters(wrapped)
    tokens = int(batch["attention_mask"].sum())
    beyond = {
        n: int(((got[n] - expected[n]).abs() > step_tolerance(grads[n], expected[n], tokens)).sum()) for n in expected
    }
    raw = wrapped.module if hasattr(wrapped, "module") else wrapped
    nf4_now = {n: m.weight.packed for n, m in raw.named_modules() if is_nf4(m)}
    nf4_same = nf4_now.keys() == nf4_before.keys() and all(torch.equal(nf4_now[n], nf4_before[n]) for n in nf4_before)
    frozen_now = {n.removeprefix("module."): p for n, p in wrapped.named_parameters() if not p.requires_grad}
    full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()  # noqa: E731
    frozen_same = all(torch.equal(full(frozen_now[n]), frozen_before[n]) for n in frozen_before)
    report = {
        "rank": ctx.rank, "world_size": ctx.world_size, "backend": ctx.backend, "mode": "fsdp2" if args.fsdp else "ddp",
        "single_process_loss": single_loss, "distributed_loss": dist_loss,
        "adapter_elements": sum(t.numel() for t in expected.values()),
        "adapter_elements_beyond_tolerance": sum(beyond.values()),
        "max_adapter_abs_diff": max((got[n] - expected[n]).abs().max().item() for n in expected),
        "nf4_bit_identical": nf4_same, "frozen_bit_identical": frozen_same,
        "memory_bytes": memory_per_rank(wrapped, optimizer),
    }
    reports = [None] * ctx.world_size
    dist.all_gather_object(reports, report)
    if ctx.is_main:
        text = json.dumps(reports, indent=2)
        print(text)
        if args.out:
            with open(args.out, "w") as handle:
                handle.write(text)
    dist.barrier()
    del wrapped, optimizer
    teardown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora_lab.finetune.distributed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="one DDP (or FSDP2) step equals one single-process step on the whole batch")
    c.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP")
    c.add_argument("--seed", type=int, default=0, help="model and data seed (default 0)")
    c.add_argument("--out", help="rank 0 writes the per-rank JSON report here")
    c.add_argument("--fail-rank", type=int, default=None, help="make this rank raise, to see every rank stop")
    args = parser.parse_args(argv)
    return check(args)


def exit_worker(code: int) -> None:
    """Leave a torchrun worker without running C++ static destructors.

    Intermittently (about one run in ten here) gloo's worker threads are torn
    down in the wrong order at interpreter exit and the process aborts with
    "terminate called without an active exception", after its work was done
    and reported. Flushing and ``os._exit`` skips that teardown.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_worker(main())
