"""How the small-M kernel (``qlora_small_m.py``) is sized: its tiles, and how many slices of K it splits W into.

How many slices
---------------
More slices give more programs streaming W, but each slice adds an fp32
(M, N) partial to write and read back: ``16·M/K`` of W's bytes per slice
(W is K/2 bytes a row; a partial row is 4·M bytes, written and read). At M = 1
that is 0.4 % a slice for K = 4096; at M = 16 it is 6 %. ``split_k_for``
therefore picks the divisor of K's steps that minimizes a simple cost,
``(1 + workspace share) x max(1, TARGET_PROGRAMS / programs)``: W's bytes plus
the workspace's, slowed down in proportion when fewer programs than
``TARGET_PROGRAMS`` share the bandwidth.

For Llama-3.1-8B's layers at M = 1 that gives 512 to 896 programs, and a
workspace of 3 % (gate/up/down_proj) to 25 % (k/v_proj, N = 1024) of W's bytes,
written and read. At M = 16 the same grids cost 25 % to 400 %, which the model
still prefers to grids of 32 to 128 programs. The workspace is read back right
after it is written, mostly from L2, which the model does not credit; whether
its trade holds at M = 16 is for a GPU to measure (``lora-lab bench``).
"""

from __future__ import annotations

import torch
import triton
from lora_lab.kernels.common import INTERPRETING

# Programs to aim for: H100/H200 have 132 SMs, A100 108; a few programs per SM hide the latency of each one's loads.
TARGET_PROGRAMS = 4 * 132
# (BLOCK_N, BLOCK_K, num_warps, num_stages). On a GPU 16 x 128 tiles with 4 warps, 64 weights a thread: the K loop's
# fixed work per step (x tile, addresses, bookkeeping) is spread over them, where 16 x 64 took 12.9 SASS instructions a
# weight on sm_90a. One stage: with more, Triton's pipeliner copies the level-table gather through shared memory
# (LDGSTS, then LDS); with one it is a plain LDG that hits L1 (the table is 2 KB), and this kernel hides its loads'
# latency with its many programs (4 blocks an SM at <= 128 registers) rather than software pipelining. Measured with
# compile_check --sass, bf16, r = 16, Triton 3.9, with W's byte pointers advanced along K rather than recomputed each
# step: 5.72 instructions a weight on sm_90a and 5.89 on sm_80 (123 and 128 registers), where 3 stages took 6.56 and
# 6.20 (130 and 96 registers); 2 stages serialize the wgmma on sm_90a (C7515). With ``convert_here`` as well: 5.08 and
# 5.19 (124 and 96 registers; r = 64: 5.23 and 5.22), and there 3 stages took 7.19 (C7515) and 5.97, 16 x 256 x 64
# with 8 warps 5.00 and 5.16 for half the programs, 16 x 64 x 128 5.23 and 5.31. With W's loads unmasked and unsigned
# block indices (the kernel as it is): 4.86 and 5.02, 128 and 96 registers (r = 64: 128 and 128), 4 blocks an SM.
# Under Triton 3.6 (the GPU machine's; the K loop is the one with the 8 HGMMA/16 HMMA, not the x @ A^T loop that 3.6
# turns into mma in bf16): 6.91 on sm_90a and 6.42 on sm_80, where the
# tile with 3 stages took 7.16 with its wgmma serialized (C7515) and 8.58; 3.6 stores the converted tile to shared
# memory 16 bits at a time, so there convert_here costs sm_90a 0.6 a weight (6.31 without) and saves sm_80 1.25 (7.67).
# The interpreter pays per program.
# fp32 has no tensor-core path (IEEE tl.dot is FMAs) and its operands are twice the size: 16 x 128 x 64 took 160
# registers on sm_90a and all 255 on sm_80 (before the operand swap it spilled 480 B and 4,972 B, Triton 3.9);
# 16 x 64 x 64 with 4 warps takes 66 and 72, no spill.
GPU_TILE, FP32_GPU_TILE, INTERPRETER_TILE = (128, 64, 4, 1), (64, 64, 4, 3), (64, 64, 4, 1)
BLOCK_N, BLOCK_K = (INTERPRETER_TILE if INTERPRETING else GPU_TILE)[:2]  # fp16/bf16's, as the static model reads them


def workspace_share(split_k: int, m: int, k: int) -> float:
    """The workspace's traffic (fp32 partials written, then read) as a share of W's NF4 bytes (K/2 a row)."""
    return 2 * 4 * split_k * m / (k / 2)


def split_k_for(n: int, k_steps: int, block_n: int | None = None, m: int = 1, block_k: int | None = None) -> int:
    """Slices of K for ``m`` rows: the divisor of K's ``k_steps`` steps with the least estimated time.

    The estimate is ``(1 + workspace_share) * max(1, TARGET_PROGRAMS / programs)`` (see the module docstring); on a
    tie, fewer slices.
    """
    programs_per_slice = triton.cdiv(n, block_n or BLOCK_N)
    k = k_steps * (block_k or BLOCK_K)

    def cost(split: int) -> float:
        return (1 + workspace_share(split, m, k)) * max(1.0, TARGET_PROGRAMS / (programs_per_slice * split))

    return min((d for d in range(1, k_steps + 1) if k_steps % d == 0), key=lambda d: (cost(d), d))


def tile_for(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """Launch 1's ``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` for activations of ``dtype``."""
    if INTERPRETING:
        return INTERPRETER_TILE
    return FP32_GPU_TILE if dtype == torch.float32 else GPU_TILE


def step_k(k: int, blocksize: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Launch 1's BLOCK_K for a K of ``k`` in NF4 blocks of ``blocksize``: the tile's, if it divides K.

    A step may span several NF4 blocks (an absmax each) or part of one; where the tile's BLOCK_K does not divide K
    (K is only a multiple of the blocksize), one NF4 block, or the tile's BLOCK_K if smaller.
    """
    block_k = tile_for(dtype)[1]
    return block_k if k % block_k == 0 else min(block_k, blocksize)


def small_m_grid(m: int, n: int, k: int, blocksize: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """Launch 1's grid ``(cdiv(N, BLOCK_N), SPLIT_K)`` for ``m`` rows of a layer (N, K) in NF4 blocks of ``blocksize``."""
    block_n, block_k = tile_for(dtype)[0], step_k(k, blocksize, dtype)
    return triton.cdiv(n, block_n), split_k_for(n, k // block_k, block_n, m, block_k)
