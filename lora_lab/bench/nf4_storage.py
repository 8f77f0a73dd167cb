"""The CPU benchmark's NF4 storage comparison: quantize and dequantize one 4096 x 4096 weight, ours against bitsandbytes.

QLoRA quantizes every base weight once, when the model loads, and dequantizes
each one twice per training step (forward, and backward for dX). Both are
timed here on Llama 3.1 8B's q_proj shape in fp32 with QLoRA's settings
(blocksize 64, double quantization), alternating call by call with
bitsandbytes' ``quantize_4bit`` / ``dequantize_4bit``, and the bytes and values
must be identical to bitsandbytes' or the record is WRONG.

Dequantize moves little data per element, so its memory-bound estimate is the
measure: the bytes it must read and write at the measured copy bandwidth. A
dequantize returns a new tensor, and on the CPU a fresh 64 MB tensor is mapped
in by the OS page by page on its first write; "fresh output" times exactly
that (``torch.empty`` then ``fill_``), the part of any dequantize that no
faster arithmetic can remove.
"""

from __future__ import annotations

import statistics

import torch

from lora_lab.bench.timing import Record, Roofline, Settings, Timer
from lora_lab.nf4 import dequantize_nf4, quantize_nf4

STORAGE_SHAPE = (4096, 4096)  # Llama 3.1 8B's q_proj and o_proj (N x K)
BLOCKSIZE = 64  # QLoRA's, with double quantization
BASELINE = "bitsandbytes"
FRESH_OUTPUT = "fresh output"  # torch.empty + fill_ of the dequantized size: the page-mapping floor
STORAGE_REPEATS = 7


def storage_records(timer: Timer, settings: Settings, roofline: Roofline | None) -> list[Record]:
    """Median times of quantize and dequantize, ours and bitsandbytes', interleaved call by call, with their floors."""
    import bitsandbytes.functional as bnb

    N, K = STORAGE_SHAPE
    g = torch.Generator().manual_seed(settings.seed)
    weight = torch.randn(N, K, generator=g) * 0.02
    ours = quantize_nf4(weight, BLOCKSIZE, double_quant=True)
    packed, state = bnb.quantize_4bit(weight, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    same_bytes = torch.equal(ours.packed, packed.reshape(-1)) and torch.equal(ours.absmax, state.absmax)
    same_values = torch.equal(dequantize_nf4(ours), bnb.dequantize_4bit(packed, state))
    calls = {
        ("quantize", "reference"): lambda: quantize_nf4(weight, BLOCKSIZE, double_quant=True),
        ("quantize", BASELINE): lambda: bnb.quantize_4bit(
            weight, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True),
        ("dequantize", "reference"): lambda: dequantize_nf4(ours),
        ("dequantize", BASELINE): lambda: bnb.dequantize_4bit(packed, state),
        ("dequantize", FRESH_OUTPUT): lambda: torch.empty(N * K).fill_(1.0),
    }
    for call in calls.values():
        call()  # warm-up (bitsandbytes compiles its CPU dequantize on the first call)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for _ in range(settings.repeats or STORAGE_REPEATS):
        for key, call in calls.items():
            times[key].append(timer.time_call(call))
    dense, stored = weight.numel() * 4, ours.nbytes
    moved = {"quantize": dense + stored, "dequantize": stored + dense}  # read one, write the other
    records = []
    for (op, impl), trials in times.items():
        ms = statistics.median(trials)
        correct = impl != "reference" or (same_bytes if op == "quantize" else same_values)  # bitsandbytes defines right
        floor = None if roofline is None else moved[op] / (roofline.copy_gbps * 1e9) * 1e3
        records.append(Record(
            op=op, M=N * K, N=N, K=K, r=0, dtype="fp32", impl=impl, ms=ms, tflops=0.0,
            gbps=moved[op] / (ms * 1e-3) / 1e9, peak_mem_mb=timer.peak_memory_mb(calls[op, impl]),
            max_rel_err=0.0 if correct else 1.0, scope="storage", correct=correct,
            floor_ms=floor, pct_of_floor=None if floor is None else 100 * floor / ms,
            note="" if correct else f"{op}: not bitsandbytes' bytes and values",
        ))
    return records
