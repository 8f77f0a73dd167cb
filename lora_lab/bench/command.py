"""Correctness and speed of the QLoRA linear layer, implementations side by side.

On a GPU (``--gpu``, or any machine with CUDA) it times, on Llama-3.1-8B layer
shapes, the forward, the backward (dX, dA, dB) and both together of:

  fused           lora_lab.kernels.fused_qlora_linear: NF4 decoded inside the Triton matmuls
  dequant+cublas  dequantize W to a temporary, x @ W^T, then the adapter path with addmm (Unsloth's matmul_lora)
  bnb+peft        peft's LoRA on a bitsandbytes Linear4bit: what most people fine-tune with
  dense           W already dequantized to x's dtype, then the same matmuls: the ideal, at ~4x the memory
  reference       lora_lab.lora.qlora_linear, the readable op every kernel must equal

Without a GPU it compares the reference with bitsandbytes + peft on the CPU:
the layer at a few shapes, NF4 quantize and dequantize of a 4096 x 4096 weight
and a whole training step of the tiny model, and prints the three ratios side
by side. Kernel timings need a GPU: on the CPU the Triton kernels run under
Triton's interpreter, about 2 minutes a case, so '--impls fused' there is
refused unless '--interpreted' says that is what you want.

Results go to runs/bench/<date>-<device>.json when the run is the default one,
and to <date>-<device>-partial.json (or -quick) when it is a selection, so a
partial run never replaces the day's full results. The file is written when
the run ends; until then the results so far are in <file>.incomplete.json,
which is what a run interrupted with Ctrl-C leaves (exit status 130).

Every result is re-checked against float64 after timing; a wrong result is
marked WRONG and the command exits 1. See lora_lab/bench/timing.py for how the
timing is made trustworthy, and benchmarks/README.md for results.

examples:
  lora-lab bench                                    # CPU: about 60 s on 2 cores, with a progress bar
  lora-lab bench --gpu --quick --json bench.json    # what benchmarks/gpu_check.sh runs (about 4 minutes)
  lora-lab bench --gpu --shapes 4096x14336 --tokens 1,4096 --ranks 16 --ops forward --plot times.png
  lora-lab bench --plan                             # the static performance model (any machine; measured on a GPU)
  lora-lab bench --plan --json plan.json            # ... and its records and assumptions as JSON
"""

from __future__ import annotations

import argparse
import re
import sys

from lora_lab.bench.names import DTYPE_NAMES, IMPL_NAMES, OPS
from lora_lab.cli.arguments import output_file_problem


def _list_of(kind, what: str, allowed=None):
    def parse(text: str):
        items = [item.strip() for item in text.split(",") if item.strip()]
        try:
            values = tuple(kind(item) for item in items)
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}") from None
        bad = [v for v in values if allowed is not None and v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected {what} from {', '.join(map(str, allowed))}, got {text!r}")
        return values

    return parse


def _positive(text: str) -> int:
    """A whole number of at least 1; argparse prints the message after the flag's name ("argument --repeats: ...")."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _shape(text: str) -> tuple[int, int]:
    """'4096x14336' -> (K, N) = (in_features, out_features); K must be a multiple of the NF4 blocksize, 64."""
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or int(match[1]) % 64 or int(match[1]) < 1 or int(match[2]) < 1:
        raise argparse.ArgumentTypeError(f"expected KxN with K a positive multiple of 64, got {text!r}")
    return int(match[1]), int(match[2])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--gpu", action="store_true", help="the kernel benchmark on the CUDA device (fails without one)")
    where.add_argument("--cpu", action="store_true", help="the CPU benchmark even where a GPU exists")
    parser.add_argument("--quick", action="store_true", help="(GPU) a subset that fits in about 4 minutes on an H100/H200")
    parser.add_argument("--json", metavar="FILE", help="write results here (default: runs/bench/<date>-<device>.json, "
                        "-partial.json for a selection)")
    parser.add_argument("--plot", metavar="FILE", help="also save a chart of time per implementation per case (PNG)")
    parser.add_argument("--shapes", type=_list_of(_shape, "KxN layer shapes (in x out features, K a multiple of 64)"),
                        help="layer shapes, e.g. 4096x4096,4096x14336 (default: Llama-3.1-8B's four on a GPU)")
    parser.add_argument("--tokens", type=_list_of(_positive, "positive token counts M"), help="rows of x, e.g. 1,16,4096")
    parser.add_argument("--ranks", type=_list_of(_positive, "positive LoRA ranks"), help="LoRA ranks, e.g. 16,64")
    parser.add_argument("--dtypes", type=_list_of(str, "dtypes", DTYPE_NAMES), help="bf16, fp16 and/or fp32")
    parser.add_argument("--ops", type=_list_of(str, "ops", OPS), help="forward, backward and/or step (default: all three)")
    parser.add_argument("--impls", type=_list_of(str, "implementations", IMPL_NAMES), help=f"from {', '.join(IMPL_NAMES)}")
    parser.add_argument("--interpreted", action="store_true",
                        help="(CPU) run '--impls fused' under Triton's interpreter anyway: about 2 minutes a case, "
                        "and the times measure the interpreter, not the kernels")
    parser.add_argument("--repeats", type=_positive, help="timed trials per implementation (default: as many as fit a budget)")
    parser.add_argument("--input-sets", type=_positive, default=3, help="seeded input sets the trials rotate among (default 3)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="start no new case after this many seconds (default: 210 with --gpu --quick, else none)")
    parser.add_argument("--no-model", action="store_true", help="skip the tiny model's training step (CPU)")
    parser.add_argument("--no-nf4", action="store_true", help="skip NF4 quantize/dequantize of a 4096 x 4096 weight (CPU)")
    parser.add_argument("--vocab-step", action="store_true", help="(CPU) also a step with Llama 3's 128,256-token "
                        "vocabulary, batch 16 x sequence 64: every position's logits vs only the labelled ones (~1 min)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: on a busy machine a multi-threaded matmul waits for "
                        "descheduled threads and measures the scheduler; 0 keeps torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plan", action="store_true",
                        help="print the static performance model of the kernels on Llama-3.1-8B layers (H200, H100, A100) "
                        "from their compiled code and counted launches, no GPU needed; on a GPU with measured times; "
                        "with --json FILE also one record per GPU, layer, M and path (lora_lab/bench/plan.py)")


def run(args: argparse.Namespace) -> int:
    """The benchmark (``runner``); Ctrl-C ends it with one line and exit status 130, never a traceback.

    torch and the implementations are imported here, not at the top, so that
    ``lora-lab bench --help`` answers in a fraction of a second.
    """
    try:
        if args.plan:
            from lora_lab.bench.plan import run_plan

            if args.json and (problem := output_file_problem("--json", args.json, "to write the plan into")):
                print(f"lora-lab bench: {problem}", file=sys.stderr)
                return 2

            return run_plan(args.json)
        from lora_lab.bench import runner

        return runner.run(args)
    except KeyboardInterrupt:
        print("lora-lab bench: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
