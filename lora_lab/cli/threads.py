"""How many CPU threads torch uses in ``lora-lab demo`` and ``lora-lab train``: one, unless told otherwise.

torch starts one thread per core. On a small machine that is also busy (two
cores shared with an editor, a browser or another run), every matmul waits for
its slowest thread, and a descheduled thread spins: ``lora-lab demo`` took 414 s
with torch's default on a busy 2-core box against 30 s with one thread. The tiny
model's matrices are too small to gain from more threads anyway, so the
commands default to one, as ``lora-lab bench`` does; ``--threads N`` or
``LORA_LAB_THREADS=N`` asks for N, and 0 keeps torch's default.
"""

from __future__ import annotations

import argparse
import os

from lora_lab import THREADS_ENV
from lora_lab.cli.arguments import whole_number

ENV = THREADS_ENV
_threads = whole_number(0, why="0: torch's default")  # parses --threads and $LORA_LAB_THREADS alike


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads``; its default comes from $LORA_LAB_THREADS, else 1."""
    default = os.environ.get(ENV, "1")
    try:
        default_threads = _threads(default)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"${ENV}: {exc}")
    parser.add_argument(
        "--threads", type=_threads, default=default_threads, metavar="N",
        help=f"CPU threads for torch (default: ${ENV}, else 1, which is fastest on a small or busy machine; 0: torch's "
        "default of one per core)",
    )


def apply_threads(threads: int) -> None:
    """Cap torch's intra-op threads at ``threads`` (0 leaves torch's default alone)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
