"""How big are the adapters, and how much does NF4 save? Computed from a model's config alone.

    lora-lab size --preset llama-3.1-8b --r 32 --alpha 64 --targets q_proj,k_proj,v_proj,o_proj
    lora-lab size --preset llama-3.2-1b --r 8 --targets q_proj,v_proj

The model is built on PyTorch's "meta" device: every module and shape exists,
but no weight is allocated or downloaded. The arithmetic:

- a LoRA adapter on an N x K linear layer has r * (K + N) parameters (A is r x K, B is N x r);
- bf16 stores 2 bytes per weight;
- NF4 stores half a byte per weight plus one absmax per block of 64 weights:
  4 bytes (fp32), or with double quantization 1 byte plus 4 bytes per 256 blocks.

As in QLoRA, every linear layer of the decoder blocks is quantized; the
embeddings, the norms and the output head stay in bf16.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

from lora_lab.cli.arguments import number, whole_number

KEPT_IN_BF16 = ("lm_head",)  # linear layers QLoRA leaves unquantized
# Spelt out (tests check them against lora_lab.model) so that `lora-lab --help` need not import torch.
PRESET_NAMES = ("llama-3.1-8b", "llama-3.2-1b", "tiny")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Past these a step's memory is a meaningless number: no single step holds more prompts, and no preset reads
# longer prompts than Llama 3.1's context length.
MAX_BATCH = 4096
MAX_SEQUENCE = 131072


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", default="llama-3.1-8b", help=f"model shape: {', '.join(PRESET_NAMES)} (default: llama-3.1-8b)"
    )
    parser.add_argument("--r", type=whole_number(1), default=32,
                        help="LoRA rank, at most the smaller side of the smallest targeted layer (default: 32)")
    parser.add_argument("--alpha", type=number(0, open_low=True), default=64,
                        help="LoRA alpha; the update is scaled by alpha/r (default: 64)")
    parser.add_argument(
        "--targets", default=",".join(DEFAULT_TARGETS),
        help=f"comma-separated linear layers that get adapters (default: {','.join(DEFAULT_TARGETS)})",
    )
    parser.add_argument("--blocksize", type=int, default=64, help="NF4 block size (default: 64)")
    parser.add_argument("--batch", type=whole_number(1, MAX_BATCH), default=16,
                        help="prompts per training step, for its memory (default: 16)")
    parser.add_argument("--sequence", type=whole_number(2, MAX_SEQUENCE, "Llama 3.1's context length"), default=512,
                        help="tokens per prompt, for its memory (default: 512)")


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = False) -> int:
    """Storage of one NF4 weight, exactly ``quantize_nf4(w, blocksize, double_quant).nbytes``."""
    from lora_lab.nf4 import ABSMAX_BLOCKSIZE

    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * math.ceil(blocks / ABSMAX_BLOCKSIZE) + 4  # uint8 codes, fp32 scales, fp32 offset


@dataclass(frozen=True)
class SizeReport:
    preset: str
    targets: tuple[str, ...]
    r: int
    alpha: float
    adapted_layers: int  # linear modules that get an adapter
    adapter_params: int
    total_params: int  # the base model's parameters (tied weights counted once)
    quantized_params: int  # weights that NF4 stores
    bf16_bytes: int  # the whole base model in bf16
    nf4_bytes: int  # quantized layers in NF4 (fp32 absmax), the rest in bf16
    nf4_double_quant_bytes: int  # the same with double quantization

    @property
    def adapter_fp32_bytes(self) -> int:
        return 4 * self.adapter_params

    @property
    def adapter_bf16_bytes(self) -> int:
        return 2 * self.adapter_params


def size_report(preset: str, r: int = 32, alpha: float = 64, targets=DEFAULT_TARGETS, blocksize: int = 64) -> SizeReport:
    """Adapter and base-weight sizes of ``preset``, from a weightless (meta-device) model."""
    import torch
    from torch import nn
    from transformers import LlamaForCausalLM

    from lora_lab.model import ModelPreset, linear_names
    from lora_lab.nf4 import VALID_BLOCKSIZES

    shape = ModelPreset.from_name(preset)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"expected the rank r to be a positive integer, got {r!r}")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"expected blocksize to be a power of two from 32 to 4096, got {blocksize}")
    targets = tuple(t for t in targets if t)
    if not targets:
        raise ValueError("expected at least one target module, such as q_proj")
    with torch.device("meta"):
        model = LlamaForCausalLM(shape.to_config())
    available = linear_names(model)
    unknown = sorted(set(targets) - set(available))
    if unknown:
        raise ValueError(f"unknown target module(s) {', '.join(unknown)}; the linear layers are named {', '.join(available)}")

    linears = [(name.rsplit(".", 1)[-1], m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    adapted = [m for short, m in linears if short in targets]
    # A rank above a layer's smaller side adds parameters but no expressive power: B @ A is full rank already.
    narrowest = min(adapted, key=lambda m: min(m.in_features, m.out_features))
    most = min(narrowest.in_features, narrowest.out_features)
    if r > most:
        name = next(short for short, m in linears if m is narrowest)
        raise ValueError(f"expected the rank r from 1 to {most}, the smaller side of {name} "
                         f"({narrowest.out_features} x {narrowest.in_features}) in {preset}; got {r}")
    quantized = [m.weight.numel() for short, m in linears if short not in KEPT_IN_BF16]
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    rest_bf16 = 2 * (total - sum(quantized))
    return SizeReport(
        preset=preset, targets=targets, r=r, alpha=alpha, adapted_layers=len(adapted),
        adapter_params=sum(r * (m.in_features + m.out_features) for m in adapted),
        total_params=total, quantized_params=sum(quantized), bf16_bytes=2 * total,
        nf4_bytes=rest_bf16 + sum(nf4_bytes(n, blocksize) for n in quantized),
        nf4_double_quant_bytes=rest_bf16 + sum(nf4_bytes(n, blocksize, True) for n in quantized),
    )


def human(n_bytes: float) -> str:
    """Decimal units, as model cards and download sizes use them (1 MB = 10^6 bytes)."""
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:,.2f} GB"
    return f"{n_bytes / 1e6:,.2f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:,.2f} kB"


def format_report(report: SizeReport, blocksize: int = 64) -> str:
    from lora_lab.model import ModelPreset

    shape = ModelPreset.from_name(report.preset)
    quantized_bf16 = 2 * report.quantized_params
    rest = report.bf16_bytes - quantized_bf16
    bits = lambda total: 8 * (total - rest) / report.quantized_params  # noqa: E731
    lines = [
        f"{report.preset}: hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads ({shape.kv_heads} key/value), "
        f"MLP {shape.intermediate}, vocabulary {shape.vocab:,}",
        "  (built on the meta device: shapes only, no weights)",
        "",
        f"LoRA adapters: r={report.r}, alpha={report.alpha:g} (scaling {report.alpha / report.r:g}) "
        f"on {', '.join(report.targets)}: {report.adapted_layers} layers",
        f"  parameters  {report.adapter_params:>16,}   ({100 * report.adapter_params / report.total_params:.2f}% "
        f"of the base model's {report.total_params:,})",
        f"  fp32        {human(report.adapter_fp32_bytes):>16}",
        f"  bf16        {human(report.adapter_bf16_bytes):>16}",
        "",
        f"Base weights: {report.quantized_params:,} in the decoder's linear layers are quantized; "
        f"embeddings, norms and lm_head stay bf16 ({human(rest)})",
        f"  {'storage':<34}{'total':>12}{'bits per quantized weight':>28}",
        f"  {'bf16 (no quantization)':<34}{human(report.bf16_bytes):>12}{bits(report.bf16_bytes):>28.3f}",
        f"  {f'NF4, blocksize {blocksize}, fp32 absmax':<34}{human(report.nf4_bytes):>12}{bits(report.nf4_bytes):>28.3f}",
        f"  {'NF4 + double quantization':<34}{human(report.nf4_double_quant_bytes):>12}"
        f"{bits(report.nf4_double_quant_bytes):>28.3f}",
        f"  double quantization saves {human(report.nf4_bytes - report.nf4_double_quant_bytes)}; "
        f"NF4 is {report.bf16_bytes / report.nf4_double_quant_bytes:.2f}x smaller than bf16",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    targets = tuple(t.strip() for t in args.targets.split(","))
    try:
        report = size_report(args.preset, args.r, args.alpha, targets, args.blocksize)
    except ValueError as exc:
        print(f"lora-lab size: {exc}", file=sys.stderr)
        return 2
    from lora_lab.cli.step_memory import format_step_memory, step_memory
    from lora_lab.model import ModelPreset

    memory = step_memory(ModelPreset.from_name(args.preset), report.adapter_params, args.r, targets, args.batch, args.sequence)
    print("\n".join([format_report(report, args.blocksize), *format_step_memory(memory, args.batch, args.sequence, human)]))
    return 0
