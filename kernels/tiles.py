"""Tile shapes for the two NF4 matmul kernels, and the autotuning they share.

Every shape offered on a GPU compiles without a register spill, without
serialized wgmma and within the shared memory of sm_90a (H100/H200) and sm_80
(A100), forward and dX, decoding NF4 and reading a dense W, in fp32, fp16 and
bf16, at r = 16 and 64: ``python -m lora_lab.kernels.compile.compile_check`` checks it,
and CI runs its representative subset.
"""

from __future__ import annotations

import triton
from lora_lab.kernels.common import AUTOTUNE, FP32, INTERPRETING


def matmul_configs() -> list[triton.Config]:
    """Tile shapes for the two matmul kernels.

    Under the interpreter, which pays per program and per loop step rather than
    per element: one large tile, with 64-wide K steps (32 for blocksize 32).

    On a GPU, a handful of shapes for the autotuner: 64-wide K steps (one NF4
    block at the default blocksize) with large output tiles for prefill and
    training, 32-row tiles for the M just above the small-M kernel's, and 32-wide
    K steps for blocksize 32. ``keep_tiles_inside_nf4_blocks`` drops those a
    weight's blocksize cannot use. The first valid config is the default without
    autotuning. Every one compiles clean (``python -m lora_lab.kernels.compile.compile_check``):
    on the NF4 path 4-warp tiles 128 wide, 16-row tiles, a 4-warp 64x128x128 and
    (Triton 3.6, sm_90a) 32x128x64 spilled; with Triton 3.9 on sm_90a, 64x128x64
    w8 (the former default) serialized its wgmma in the forward at r = 64, and
    128x64x64 w4, 64x128x32 w4, 128x128x32 w8 and 64x64x32 w4 in the forward or
    dX at r = 16 or 64; so they are not offered on that path. On the dense path on
    sm_80, 128x128x64 w8 and 64x128x64 w4 spilled at r = 64 (128x128x32 w8 also
    overflowed shared memory), and 128x64x64 and 64x128x64 w8 in dX at r = 16.
    """
    if INTERPRETING:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": k, "GROUP_M": 4}) for k in (64, 32)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for (m, n, k, w, s), _ in TILES
    ]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) and the path that may use it: "nf4" (fp16/bf16, decoding in
# registers), "dense" (fp16/bf16, W dequantized once, M >= 1024) or "fp32" (either W path). For each path the first
# valid one is its default. Reading a dense tile leaves ptxas other registers to work with, so the two paths spill and
# serialize on different tiles. fp32 multiplies without tensor cores (tl.dot in IEEE precision is scalar FMAs, with
# the operands in registers): every fp16/bf16 tile spilled in fp32 (the NF4 forward's 64x128x64 w8: 14,476 bytes),
# so fp32 has a small tile of its own.
TILES = [
    ((128, 64, 64, 8, 3), "nf4"),
    ((128, 64, 32, 8, 4), "dense"),
    ((32, 64, 64, 4, 4), "nf4"),
    ((64, 64, 64, 4, 3), "dense"),
    ((32, 64, 32, 4, 4), "nf4"),
    ((64, 64, 32, 4, 4), "dense"),
    ((32, 32, 32, 4, 1), "fp32"),
]


def keep_tiles_inside_nf4_blocks(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune pruning: BLOCK_K must divide the NF4 blocksize (one absmax per tile row), and the tile suit the path.

    With ``AUTOTUNE`` off only the first valid config is kept, so nothing is benchmarked.
    """
    blocksize = named_args["NF4_BLOCKSIZE"]
    valid = [c for c in configs if blocksize % c.kwargs["BLOCK_K"] == 0]
    if not INTERPRETING:  # (the interpreter's two tiles serve every path)
        path = "fp32" if kwargs.get("X_KIND") == FP32.value else "dense" if kwargs.get("W_DENSE") else "nf4"
        allowed = {shape for shape, tile_path in TILES if tile_path == path}
        shape = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
        valid = [c for c in valid if shape(c) in allowed]
    return valid if AUTOTUNE else valid[:1]


def autotune_over_nf4_tiles(kernel):
    """The autotuning both matmul kernels share: ``matmul_configs``, keyed on (M bucket, N, K, blocksize).

    The blocksize is in the key because a BLOCK_K tuned for one blocksize may
    straddle two NF4 blocks of a smaller one.
    """
    return triton.autotune(
        configs=matmul_configs(),
        key=["M_BUCKET", "N", "K", "NF4_BLOCKSIZE"],
        prune_configs_by={"early_config_prune": keep_tiles_inside_nf4_blocks},
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
