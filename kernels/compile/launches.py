"""The kernel launches the compile check compiles: each launcher called on a real layer's shape, its kernel recorded.

Each launcher (``qlora_forward``, ``qlora_grad_input``, ``qlora_small_m_partials``, ``nf4_dequantize``) is called on CPU
tensors of a Llama-3.1-8B layer's shape with its kernel replaced by a recorder, so what is compiled is exactly what
``kernel[grid](...)`` would receive on a GPU; ``kept_configs`` gives the autotune configs the kernel's own pruning
keeps for a launch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from unittest import mock

import torch

from lora_lab.nf4 import ABSMAX_BLOCKSIZE, NF4Tensor

# The layer the launchers are called with: a Llama-3.1-8B q_proj at training M (the specialization of every size
# is "a multiple of 16", as for every Llama-3.1-8B layer), r = 16 (R_PAD = r, no masked adapter columns).
SHAPE = {"M": 4096, "N": 4096, "K": 4096, "r": 16}


# The ranks the matmul kernels are compiled for: the adapter's (M, R_PAD) tile changes what ptxas does with the rest
# (at r = 64, Triton 3.9 serializes the default forward tile's wgmma on sm_90a, which r = 16 does not).
RANKS = (16, 64)


@dataclass
class Launch:
    """One kernel launch as a launcher makes it: the kernel (maybe autotuned), its arguments and its grid."""

    name: str
    kernel: object
    args: tuple
    kwargs: dict
    grid: object
    dtype: torch.dtype | None = None
    blocksize: int = 0
    rank: int = 0


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, name: str, kernel) -> None:
        self.name, self.kernel, self.launches = name, kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.name, self.kernel, args, kwargs, grid))


def empty_nf4(n: int, k: int, blocksize: int, dtype: torch.dtype) -> NF4Tensor:
    """An NF4 weight of shape (n, k) with double quantization, uninitialised: only its shape and layout matter here."""
    blocks = n * k // blocksize
    return NF4Tensor(
        torch.empty(n * k // 2, dtype=torch.uint8), torch.empty(blocks, dtype=torch.uint8), blocksize, torch.Size((n, k)),
        dtype, True, torch.empty(256), torch.empty(-(-blocks // ABSMAX_BLOCKSIZE)), 0.0,
    )


def record_launches(dtype: torch.dtype, blocksize: int, shape: dict = SHAPE) -> list[Launch]:
    """The launches of every kernel for a layer of ``shape`` in ``dtype``, as the launchers make them.

    The NF4 matmul kernels are recorded in fp16 and bf16 only (``fused_qlora_linear``
    runs fp32, and M >= DENSE_FROM_M, as nf4_dequantize + cuBLAS), and the
    small-M kernel at M = 1 (a constexpr 1 in Triton's specialization) and M = 16.
    """
    # By module path: the package's own `nf4_dequantize` is the function, which shadows its module.
    dequantize_module = importlib.import_module("lora_lab.kernels.nf4_dequantize")
    forward = importlib.import_module("lora_lab.kernels.qlora_forward")
    backward = importlib.import_module("lora_lab.kernels.qlora_backward")
    small_m = importlib.import_module("lora_lab.kernels.qlora_small_m")

    m, n, k, r = shape["M"], shape["N"], shape["K"], shape["r"]
    weight = empty_nf4(n, k, blocksize, dtype)
    x, dy = torch.empty(m, k, dtype=dtype), torch.empty(m, n, dtype=dtype)
    lora_A, lora_B = torch.empty(r, k, dtype=dtype), torch.empty(n, r, dtype=dtype)
    calls = (
        (forward, "qlora_forward_kernel", "", lambda: forward.qlora_forward(x, weight, lora_A, lora_B, 2.0, None)),
        (backward, "qlora_grad_input_kernel", "", lambda: backward.qlora_grad_input(dy, weight, lora_A, lora_B, 2.0)),
        (small_m, "qlora_small_m_kernel", "[M=1]", lambda: small_m.qlora_small_m_partials(x[:1], weight, lora_A)),
        (small_m, "qlora_small_m_kernel", "[M=16]", lambda: small_m.qlora_small_m_partials(x[:16], weight, lora_A)),
        (dequantize_module, "nf4_dequantize_kernel", "", lambda: dequantize_module.nf4_dequantize(weight)),
    )
    if dtype == torch.float32:
        calls = tuple(call for call in calls if call[0] not in (forward, backward))
    launches = []
    for module, name, variant, call in calls:
        recorder = _Recorder(name + variant, getattr(module, name))
        # The tensors are CPU stand-ins for CUDA ones: only their dtypes, strides and alignment reach the compiler.
        with mock.patch.object(module, name, recorder), mock.patch.object(module, "check_device", lambda *t: None, create=True):
            call()
        for launch in recorder.launches:
            launch.dtype, launch.blocksize, launch.rank = dtype, blocksize, r
        launches += recorder.launches
    return launches


def kept_configs(launch: Launch, candidates: list | None = None) -> list:
    """The autotune configs the kernel's own pruning keeps for this launch ([None] for a kernel without autotuning).

    ``candidates`` replaces them, to try other tiles: of the pruning, only the rule that BLOCK_K divides the NF4
    blocksize applies to those (the per-path lists are the project's choice, which they are there to revisit).
    """
    kernel = launch.kernel
    if not hasattr(kernel, "configs"):
        return [None]
    named_args = dict(zip(kernel.arg_names, launch.args))
    if candidates is not None:
        return [c for c in candidates if named_args["NF4_BLOCKSIZE"] % c.kwargs["BLOCK_K"] == 0]
    prune = getattr(kernel, "early_config_prune", None)
    return list(prune(kernel.configs, named_args, **launch.kwargs)) if prune else list(kernel.configs)


def describe(config) -> str:
    if config is None:
        return "-"
    k = config.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} w{config.num_warps} s{config.num_stages}"


def describe_launch(launch: Launch, config) -> str:
    """The config, or for a kernel without autotuning the tile its launcher passes."""
    if config is not None or "BLOCK_N" not in launch.kwargs:
        return describe(config)
    k = launch.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} w{k.get('num_warps', 4)} s{k.get('num_stages', 3)}"


def parse_config(text: str):
    """``"MxNxK:warps:stages"`` (e.g. ``64x128x64:4:3``) as a triton.Config, to try a tile the project does not keep."""
    import triton

    try:
        tile, warps, stages = text.split(":")
        block_m, block_n, block_k = (int(v) for v in tile.split("x"))
        return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                             num_warps=int(warps), num_stages=int(stages))
    except ValueError:
        raise SystemExit(f"--config: expected MxNxK:warps:stages such as 64x128x64:4:3, got {text!r}") from None

