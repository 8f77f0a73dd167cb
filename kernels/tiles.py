"""Tile shapes for the two NF4 matmul kernels, and the autotuning they share.

Every shape offered on a GPU compiles without a register spill, without
serialized wgmma and within the shared memory of sm_90a (H100/H200) and sm_80
(A100), forward and dX, in fp16 and bf16 (fp32 and M >= DENSE_FROM_M run
nf4_dequantize + cuBLAS instead), at r = 16 and 64:
``python -m lora_lab.kernels.compile.compile_check`` checks it, and CI runs its
representative subset.

Enough programs for the SMs
---------------------------
These kernels run for 16 < M < DENSE_FROM_M. At M = 128 a 128 x 64 output tile
gives a 4096-wide layer 64 programs: half of an H100's 132 SMs would idle. So
the pruning keeps the tiles whose grid fills the GPU (``fills_the_gpu``), and
of those prefers the tallest: a W tile is decoded once per row tile,
``cdiv(M, BLOCK_M)`` times in all, so narrowing the output tile (BLOCK_N in the
forward, BLOCK_K in dX) adds programs at no extra decoding, where shortening it
decodes W again for every extra row tile.
"""

from __future__ import annotations

import functools

import torch
import triton
from lora_lab.kernels.common import AUTOTUNE, INTERPRETING


def matmul_configs() -> list[triton.Config]:
    """Tile shapes for the two matmul kernels.

    Under the interpreter, which pays per program and per loop step rather than
    per element: one large tile, with 64-wide K steps (32 for blocksize 32).

    On a GPU, the shapes of ``TILES`` for the autotuner, in order of preference;
    ``keep_tiles_inside_nf4_blocks`` drops those a weight's blocksize cannot use
    and those whose grid leaves SMs idle. The first kept config is the default
    without autotuning. Every one compiles clean (``python -m
    lora_lab.kernels.compile.compile_check``). When the kernels still computed
    ``x @ A^T`` in their K loop, 4-warp tiles 128 wide, 16-row tiles, a 4-warp
    64x128x128 and (Triton 3.6, sm_90a) 32x128x64 spilled, and with Triton 3.9
    on sm_90a 64x128x64 w8 at r = 64 and 128x64x64 w4, 64x128x32 w4, 128x128x32
    w8 and 64x64x32 w4 at r = 16 or 64 serialized their wgmma; without it
    (Triton 3.9, bf16, blocksize 64, r = 16 and 64), 64x64x32 w4 compiles clean too.
    """
    if INTERPRETING:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": k, "GROUP_M": 4}) for k in (64, 32)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in TILES
    ]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), tallest first (see the module docstring). The forward's output
# tile is BLOCK_M x BLOCK_N, dX's BLOCK_M x BLOCK_K: 128x32x64 is the forward's at M = 128 (N = 4096: 128 programs,
# W decoded once), 128x64x32 dX's (K = 4096: 128 programs). BLOCK_K = 32 tiles also serve blocksize 32.
TILES = [
    (128, 64, 64, 8, 3),
    (128, 32, 64, 4, 3),
    (128, 64, 32, 8, 4),
    (64, 64, 64, 4, 3),
    (64, 32, 64, 4, 3),
    (32, 64, 64, 4, 4),
    (32, 32, 64, 4, 4),
    (32, 64, 32, 4, 4),
]
FILL = 0.9  # a grid "fills" the GPU from 90% of its SMs: a few idle SMs cost less than decoding W once more


@functools.cache
def streaming_multiprocessors() -> int:
    """The SMs a grid should fill: this GPU's, or an H100's 132 when compiling without one."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 132


def programs(config: triton.Config, m: int, columns: int, column_tile: str) -> int:
    """The grid of a launch with ``config``: row tiles times column tiles of the output."""
    return triton.cdiv(m, config.kwargs["BLOCK_M"]) * triton.cdiv(columns, config.kwargs[column_tile])


def fills_the_gpu(config: triton.Config, m: int, columns: int, column_tile: str) -> bool:
    return programs(config, m, columns, column_tile) >= FILL * streaming_multiprocessors()


def keep_tiles_inside_nf4_blocks(configs: list[triton.Config], named_args: dict, output: tuple[str, str] = ("N", "BLOCK_N"),
                                 **kwargs) -> list[triton.Config]:
    """Autotune pruning: BLOCK_K must divide the NF4 blocksize (one absmax per tile row); on a GPU, no tile taller
    than M needs (rounded up to a power of two, at least 32), and only tiles that fill the GPU if any does, else the
    one with the most programs. ``output``: the output's column count and its tile (forward: N; dX: K).

    With ``AUTOTUNE`` off only the first kept config is kept, so nothing is benchmarked.
    """
    blocksize = named_args["NF4_BLOCKSIZE"]
    valid = [c for c in configs if blocksize % c.kwargs["BLOCK_K"] == 0]
    if not INTERPRETING:  # (the interpreter's two tiles serve every M)
        m, columns = named_args["M"], named_args[output[0]]
        tallest = max(32, triton.next_power_of_2(m))
        valid = [c for c in valid if c.kwargs["BLOCK_M"] <= tallest] or valid
        filling = [c for c in valid if fills_the_gpu(c, m, columns, output[1])]
        valid = filling or sorted(valid, key=lambda c: -programs(c, m, columns, output[1]))[:1]
    return valid if AUTOTUNE else valid[:1]


def autotune_over_nf4_tiles(output: tuple[str, str]):
    """The autotuning both matmul kernels share: ``matmul_configs``, keyed on (M bucket, N, K, blocksize).

    ``output`` names the output's column count and its tile: ``("N", "BLOCK_N")``
    for the forward, ``("K", "BLOCK_K")`` for dX. The blocksize is in the key
    because a BLOCK_K tuned for one blocksize may straddle two NF4 blocks of a
    smaller one.
    """
    return lambda kernel: triton.autotune(
        configs=matmul_configs(),
        key=["M_BUCKET", "N", "K", "NF4_BLOCKSIZE"],
        prune_configs_by={"early_config_prune": functools.partial(keep_tiles_inside_nf4_blocks, output=output)},
        **({"do_bench": _nothing_to_compare} if INTERPRETING or not AUTOTUNE else {}),
    )(kernel)


def _nothing_to_compare(kernel_call, quantiles=None, **kwargs) -> list[float]:
    """The "benchmark" when the pruning keeps one config (the interpreter, or ``AUTOTUNE`` off): nothing is timed.

    Triton before 3.8 times even a single pruned config: with the GPU driver, which a CPU machine lacks, and on a
    GPU once per specialization, a launch of ~100 ms that the tests and the GPU check's time caps would pay for nothing.
    """
    return [0.0] * (len(quantiles) if quantiles else 1)


def autotune_key_rows(m: int) -> int:
    """M rounded up to a power of two: the autotune key, so every new batch length does not re-tune."""
    return triton.next_power_of_2(max(m, 1))
