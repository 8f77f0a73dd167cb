"""The kernel launches the compile check compiles: each launcher called on a real layer's shape, its kernel recorded.

Each launcher (``qlora_forward``, ``qlora_grad_input``, ``qlora_small_m_forward``, ``nf4_dequantize``) is called on
CPU tensors of a Llama-3.1-8B layer's shape with its kernels replaced by recorders, so what is compiled is exactly what
``kernel[grid](...)`` would receive on a GPU. A launcher that makes two launches has both recorded from the one call
(``qlora_small_m_forward``: the split-K kernel, then the reduction that reads its partials, with the split the
launcher picked); ``kept_configs`` gives the autotune configs the kernel's own pruning keeps for a launch.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from unittest import mock

import torch

from lora_lab.nf4 import ABSMAX_BLOCKSIZE, NF4Tensor

# The layer the launchers are called with: a Llama-3.1-8B q_proj at training M (the specialization of every size
# is "a multiple of 16", as for every Llama-3.1-8B layer), r = 16 (R_PAD = r, no masked adapter columns).
SHAPE = {"M": 4096, "N": 4096, "K": 4096, "r": 16}


# The ranks the kernels with an adapter (all but nf4_dequantize) are compiled for: the adapter's (M, R_PAD) tile changes
# what ptxas does with the rest (at r = 64, Triton 3.9 serializes the default forward tile's wgmma on sm_90a, which
# r = 16 does not; the small-M kernel sums x @ A^T in a (16, R_PAD) fp32 tile, its reduction multiplies it by B^T).
RANKS = (16, 64)
# Kernels that take no adapter, compiled at the first rank only (the rank changes none of their arguments).
NO_ADAPTER = ("nf4_dequantize_kernel",)


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


def defined_kernels() -> dict[str, str]:
    """Every kernel ``lora_lab.kernels`` defines, found in its modules rather than listed: name -> module.

    A kernel is a module-level Triton function (or its autotuner) whose name ends in ``_kernel``; the @triton.jit
    helpers that kernels call (``load_nf4_tile``, ``round_to``, ...) are compiled inside them and are not launched.
    A new kernel is then one the compile check and the budget must name (their tests compare against this).
    """
    import pkgutil

    from triton.runtime.jit import KernelInterface

    package = importlib.import_module("lora_lab.kernels")
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg:  # the compile tooling
            continue
        module = importlib.import_module(f"lora_lab.kernels.{info.name}")
        for name, value in vars(module).items():
            if name.endswith("_kernel") and isinstance(value, KernelInterface) and not name.startswith("_"):
                function = value
                while hasattr(function, "fn"):  # Autotuner -> JITFunction -> the function (imported ones too)
                    function = function.fn
                found[name] = function.__module__
    return found


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
    small-M kernel and its reduction at M = 1 (a constexpr 1 in Triton's
    specialization) and M = 16, both from one call of ``qlora_small_m_forward``.
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
    small_m_kernels = ("qlora_small_m_kernel", "qlora_small_m_reduce_kernel")

    def small_m_forward(rows: int):
        return lambda: small_m.qlora_small_m_forward(x[:rows], weight, lora_A, lora_B, 2.0, None)

    # (module, the kernels the call launches, the variant's suffix, the call)
    calls = (
        (forward, ("qlora_forward_kernel",), "", lambda: forward.qlora_forward(x, weight, lora_A, lora_B, 2.0, None)),
        (backward, ("qlora_grad_input_kernel",), "", lambda: backward.qlora_grad_input(dy, weight, lora_A, lora_B, 2.0)),
        (small_m, small_m_kernels, "[M=1]", small_m_forward(1)),
        (small_m, small_m_kernels, "[M=16]", small_m_forward(16)),
        (dequantize_module, ("nf4_dequantize_kernel",), "", lambda: dequantize_module.nf4_dequantize(weight)),
    )
    if dtype == torch.float32:
        calls = tuple(call for call in calls if call[0] not in (forward, backward))
    launches = []
    for module, names, variant, call in calls:
        recorders = [_Recorder(name + variant, getattr(module, name)) for name in names]
        with contextlib.ExitStack() as stack:
            for name, recorder in zip(names, recorders):
                stack.enter_context(mock.patch.object(module, name, recorder))
            # The tensors are CPU stand-ins for CUDA ones: only their dtypes, strides and alignment reach the compiler.
            stack.enter_context(mock.patch.object(module, "check_device", lambda *t: None, create=True))
            call()
        for recorder in recorders:
            if not recorder.launches:
                raise RuntimeError(f"{module.__name__}: the call recorded for {recorder.name} never launched it")
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
    """The config, or for a kernel without autotuning the tile its launcher passes, as MxNxK of its MMA.

    The small-M reduction has no K loop: its one MMA per program multiplies ``round(x @ A^T)`` (BLOCK_M x R_PAD) by
    B^T (R_PAD x TILE_N), so its tile reads BLOCK_M x TILE_N x R_PAD.
    """
    k = launch.kwargs
    if config is None and "TILE_N" in k:
        return f"{k['BLOCK_M']}x{k['TILE_N']}x{k['R_PAD']} w{k.get('num_warps', 4)} s{k.get('num_stages', 3)}"
    if config is not None or "BLOCK_N" not in k:
        return describe(config)
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

