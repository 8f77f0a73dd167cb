"""The GPU kernels one call launches, counted from the code itself: the launch list of ``lora-lab bench --plan``.

Why count rather than list by hand
----------------------------------
At small M a layer's forward is over in about 10 us, and every kernel launch
adds a gap of its own (``plan_model.py`` says how much); a path that launches nine
kernels cannot reach the bandwidth a one-kernel path reaches. The kernels
change, so the launches are counted by running the op, never written down:

- *torch ops*: a ``TorchDispatchMode`` sees every aten op below autograd. Each
  one that is not a view, a bare allocation or a metadata query runs a GPU
  kernel (cuBLAS for a matmul, an elementwise or reduction kernel otherwise);
- *Triton kernels*: ``kernel[grid](...)`` goes through
  ``KernelInterface.__getitem__`` (``JITFunction``, ``Autotuner`` and the
  interpreter's function all inherit it), which is replaced by a recorder that
  notes the launch and does not run it.

Since no Triton kernel runs, the op can run on ``meta`` tensors of the real
layer's shape: torch computes only shapes, so the bytes of every operand and the
grid of every launch are the real ones, at no cost. ``path_launches`` does that
for ``fused_qlora_linear`` in a child process that defines the kernels compiled
(``TRITON_INTERPRET=0 LORA_LAB_COMPILE_ONLY=1`` without a GPU, as the compile
check does), so the launchers pick the GPU's tiles, not the interpreter's.

Run as ``python -m lora_lab.bench.launch_count SHAPES_JSON OUT_JSON`` it counts
every path at each (M, N, K) of SHAPES (``plan.py`` starts it).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# aten ops that launch no GPU kernel although they are not views: allocations and reshapes of a fresh buffer.
NO_KERNEL = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_unsafe_view",
                       "lift_fresh", "detach", "alias", "set_", "resize_"})
MATMULS = frozenset({"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_"})


@dataclass
class Launch:
    """One GPU kernel a call launches: what it is, the bytes of its operands, and for Triton, its grid."""

    kind: str  # "triton" or "torch"
    name: str  # the Triton kernel's function name, or the aten op's
    bytes: int  # torch: its distinct inputs once plus its outputs; Triton: its distinct tensor arguments once
    flops: int = 0  # torch matmuls: 2 x rows x columns x depth; 0 for the rest (Triton kernels: the plan's model)
    programs: dict[str, int] = field(default_factory=dict)  # Triton: config ("128x64x64 w8 s3", or "" fixed) -> grid size
    arguments: dict = field(default_factory=dict)  # Triton: its int, float and bool arguments by name (M, N, K, ...)


def _matmul_flops(name: str, tensors: list[torch.Tensor]) -> int:
    """2 x M x N x K of an aten matmul from its operands' shapes (the last two are the matrices multiplied)."""
    if name not in MATMULS:
        return 0
    a, b = tensors[-2], tensors[-1]
    return 2 * math.prod(a.shape) * b.shape[-1]


class _TorchOps(TorchDispatchMode):
    """Records each aten op that launches a kernel: its name, bytes and matmul FLOPs."""

    def __init__(self, launches: list[Launch]) -> None:
        super().__init__()
        self.launches = launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.namespace == "aten" and not func.is_view and name not in NO_KERNEL:
            inputs = list({id(t): t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}.values())
            outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            moved = sum(t.numel() * t.element_size() for t in inputs + outputs)
            self.launches.append(Launch("torch", name, moved, _matmul_flops(name, inputs)))
        return out


def _kernel_function(kernel):
    """The Python function under a Triton kernel, through its wrappers (Autotuner -> JITFunction -> function)."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def _arg_names(kernel) -> list[str]:
    while not hasattr(kernel, "arg_names") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return list(getattr(kernel, "arg_names", []))


def _describe(config) -> str:
    """A config as the compile check names it: BLOCK_MxBLOCK_NxBLOCK_K (else its meta-parameters), warps and stages."""
    k = config.kwargs
    if {"BLOCK_M", "BLOCK_N", "BLOCK_K"} <= k.keys():
        tile = f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}"
    else:
        tile = " ".join(f"{name}={value}" for name, value in k.items())
    return f"{tile} w{config.num_warps} s{config.num_stages}"


def _triton_launch(kernel, grid, args: tuple, kwargs: dict) -> Launch:
    """What ``kernel[grid](*args, **kwargs)`` would launch: the grid for each config an autotuner may pick."""
    named = dict(zip(_arg_names(kernel), args), **kwargs)
    tensors = {id(v): v for v in named.values() if isinstance(v, torch.Tensor)}.values()
    moved = sum(t.numel() * t.element_size() for t in tensors)
    configs = getattr(kernel, "configs", None)
    if callable(grid):
        programs = {_describe(c): math.prod(grid(dict(named, **c.all_kwargs()))) for c in configs or []}
        if not configs:
            programs[""] = math.prod(grid(named))
    else:
        programs = {"": math.prod(grid)}
    scalars = {k: v for k, v in named.items() if isinstance(v, (bool, int, float))}
    return Launch("triton", _kernel_function(kernel).__name__, moved, 0, programs, scalars)


@contextmanager
def counting_launches():
    """Inside, every torch op and Triton launch is recorded in the yielded list; Triton kernels are NOT run."""
    from triton.runtime.jit import KernelInterface

    launches: list[Launch] = []

    def record(kernel, grid):
        return lambda *args, **kwargs: launches.append(_triton_launch(kernel, grid, args, kwargs))

    with mock.patch.object(KernelInterface, "__getitem__", record), _TorchOps(launches):
        yield launches


def count_launches(call: Callable[[], object]) -> list[Launch]:
    """The launches of ``call()`` once its caches are warm: it is called twice, the second call counted.

    Both calls record their Triton kernels instead of running them; the first
    fills the caches a steady state has (NF4 tables copied to the device, ...).
    """
    with counting_launches():
        call()
    with counting_launches() as launches:
        call()
    return launches


def _meta_nf4(n: int, k: int, blocksize: int = 64):
    """A double-quantized NF4 weight of shape (n, k) on the meta device: only its shapes and dtypes matter here."""
    from lora_lab.nf4 import ABSMAX_BLOCKSIZE, NF4Tensor

    blocks = n * k // blocksize
    meta = {"device": "meta"}
    return NF4Tensor(torch.empty(n * k // 2, dtype=torch.uint8, **meta), torch.empty(blocks, dtype=torch.uint8, **meta),
                     blocksize, torch.Size((n, k)), torch.bfloat16, True, torch.empty(256, **meta),
                     torch.empty(-(-blocks // ABSMAX_BLOCKSIZE), **meta), 0.0)


def auto_path(m: int) -> str:
    """The path ``fused_qlora_linear`` takes at ``m`` rows when none is forced (its own ``kernel_path``)."""
    module = importlib.import_module("lora_lab.kernels.fused_qlora_linear")
    with forced_path(module, "auto"):
        return module.kernel_path(m)


@contextmanager
def forced_path(module, path: str):
    """``LORA_LAB_KERNEL_PATH=path``, in the environment and in ``module`` (``fused_qlora_linear``'s) that read it."""
    with ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {"LORA_LAB_KERNEL_PATH": path}))
        if hasattr(module, "FORCED_PATH"):
            stack.enter_context(mock.patch.object(module, "FORCED_PATH", path))
        yield


def forward_launches(path: str, m: int, n: int, k: int, r: int = 16) -> list[Launch]:
    """The kernels ``fused_qlora_linear``'s forward launches for a bf16 (m, k) x and an (n, k) NF4 W, on ``path``.

    ``path`` is forced with ``LORA_LAB_KERNEL_PATH`` unless it is the one the op
    takes anyway (``small_m`` is not a forced path: it is what ``auto`` takes at
    small M). The device checks are bypassed: meta tensors stand in for CUDA ones,
    and a check launches nothing.
    """
    module = importlib.import_module("lora_lab.kernels.fused_qlora_linear")
    forced = "auto" if path == auto_path(m) else path
    x = torch.empty(m, k, dtype=torch.bfloat16, device="meta")
    weight = _meta_nf4(n, k)
    lora_A = torch.empty(r, k, dtype=torch.bfloat16, device="meta")
    lora_B = torch.empty(n, r, dtype=torch.bfloat16, device="meta")
    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(forced_path(module, forced))
        for name, loaded in list(sys.modules.items()):
            if name.startswith("lora_lab.kernels") and hasattr(loaded, "check_device"):
                stack.enter_context(mock.patch.object(loaded, "check_device", lambda *tensors: None))
        if module.kernel_path(m) != path:
            raise ValueError(f"fused_qlora_linear takes no path {path!r} at M={m} (LORA_LAB_KERNEL_PATH={forced})")
        return count_launches(lambda: module.fused_qlora_linear(x, weight, lora_A, lora_B, 2.0))


def path_launches(m: int, n: int, k: int) -> list[dict]:
    """Every path's launches at (m, n, k): the one ``fused_qlora_linear`` takes first, then each it can be forced to."""
    module = importlib.import_module("lora_lab.kernels.fused_qlora_linear")
    taken = auto_path(m)
    paths = dict.fromkeys([taken, *(p for p in getattr(module, "PATHS", ()) if p != "auto")])
    return [{"m": m, "n": n, "k": k, "path": path, "auto": path == taken,
             "launches": [asdict(launch) for launch in forward_launches(path, m, n, k)]} for path in paths]


def main(argv: list[str]) -> int:
    """Child: SHAPES_JSON holds [[m, n, k], ...]; OUT_JSON gets {"paths": [...]}, one entry per shape and path."""
    with open(argv[0]) as f:
        shapes = json.load(f)
    importlib.import_module("lora_lab.kernels")
    results = {"paths": [entry for m, n, k in shapes for entry in path_launches(m, n, k)]}
    with open(argv[1], "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
