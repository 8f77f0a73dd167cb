"""The target's own Triton launches, recorded while the checks run: what the compile check compiles for a GPU.

Under Triton's interpreter a kernel that no GPU would accept still runs: a ``tl.dot`` whose K is 4 (the adapter's
rank padded to 4 rather than 16) gives the right numbers on the CPU, and Triton refuses to compile it for sm_90
("K >= 8"). So while the checks call the target, every launch of one of the target's own ``@triton.jit`` kernels
(its file inside the learner's folder, or the solution's package) is written down as plain data: the kernel (its
module, file and name), each argument's kind (a tensor's dtype and whether its address is 16-byte aligned, an
integer's value, a constexpr's value) and the launch options (``num_warps``, ``num_stages``). The grader asks for
them (the child's ``launches`` request) and compiles each distinct one in a compile-only process
(``grading.gpu_compile``), with exactly the arguments the checks launched it with.

Two launchers are wrapped: the interpreter's ``GridExecutor.__call__`` (no GPU, how grading runs here) and
``JITFunction.run`` (a GPU machine, where the kernels run compiled). Nothing else of Triton is touched, and a launch of
a library's kernel (bitsandbytes', anything in site-packages) is not recorded. lora_lab's own kernels are: a learner's
file that calls them is "not your code" before it runs (``grading.authorship``), so they are compiled only for
``--solutions`` and for the suite's tests of one-edit mistakes of the reference, whose kernels are lora_lab's.
"""

from __future__ import annotations

import inspect
import sys
import threading
from pathlib import Path

from lora_lab.conformance.isolation.probes import wrap_interpreter_launch

KEPT_PER_KERNEL = 32  # distinct launches remembered per kernel; the compile check compiles a few of them
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")  # the launch options that change the compiled kernel

_STATE = {"owned": (), "launches": {}}  # owned: the folders whose kernels are recorded; launches: key -> record
_LOCK = threading.Lock()


def install(owned: Path | None) -> None:
    """Record the launches of kernels defined under ``owned`` (the learner's folder, the solution's package) and of
    lora_lab's own from now on (None: record nothing); forget earlier ones.

    Called when the child loads a target, after the target imported Triton (a target that never imports Triton has
    no kernel to record, and Triton is not imported for it)."""
    with _LOCK:
        _STATE["owned"] = (Path(owned).resolve(), *_lora_lab_kernels()) if owned is not None else ()
        _STATE["launches"] = {}
    if owned is None or "triton" not in sys.modules:
        return

    def recording(launch):
        def interpreted(self, *args, **kwargs):
            _record(self.fn, set(self.constexprs), args, kwargs)
            return launch(self, *args, **kwargs)

        return interpreted

    wrap_interpreter_launch("recorded", recording)
    jit = sys.modules.get("triton.runtime.jit")
    function = getattr(jit, "JITFunction", None)
    if function is not None and not getattr(function.run, "_recorded", False):
        run = function.run

        def compiled(self, *args, grid, warmup, **kwargs):
            if not warmup:
                _record(self.fn, {p.name for p in self.params if p.is_constexpr}, args, kwargs)
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)

        compiled._recorded = True
        function.run = compiled


def recorded() -> list[dict]:
    """The distinct launches recorded since ``install``, in the order first seen, as plain data for the wire."""
    with _LOCK:
        return [dict(record) for record in _STATE["launches"].values()]


def _lora_lab_kernels() -> tuple[Path, ...]:
    """The folder of ``lora_lab.kernels`` (kernels/ in a checkout), found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("lora_lab.kernels")
    return (Path(spec.origin).resolve().parent,) if spec is not None and spec.origin else ()


def _owned(fn) -> str | None:
    """The kernel's file when it is the target's own (under an owned folder), else None."""
    filename = getattr(getattr(fn, "__code__", None), "co_filename", None)
    if not _STATE["owned"] or not filename:
        return None
    try:
        path = Path(filename).resolve()
    except OSError:
        return None
    return str(path) if any(path.is_relative_to(folder) for folder in _STATE["owned"]) else None


def describe(value, constexpr: bool) -> list:
    """One argument as plain data: what Triton's binder specializes on, and nothing of the values a tensor holds."""
    if constexpr:
        if value is None or isinstance(value, (bool, int, float, str)):
            return ["constexpr", value]
        if type(value).__name__ == "dtype" and type(value).__module__.startswith("triton"):
            return ["tl_dtype", str(value)]  # tl.float16 and the like
        return ["other", type(value).__name__]
    if hasattr(value, "data_ptr") and str(getattr(value, "dtype", "")).startswith("torch."):
        return ["tensor", str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0]
    if value is None:
        return ["none"]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    return ["other", type(value).__name__]


def specialization(kind: list):
    """What of an argument makes Triton compile another kernel: an integer's 1, multiple of 16 or 64-bit width."""
    if kind[0] == "int":
        value = kind[1]
        return ("int", value == 1, value % 16 == 0, not -(2**31) <= value < 2**31)
    if kind[0] == "float":
        return ("float",)
    return tuple(kind)


def _record(fn, constexprs: set[str], args: tuple, kwargs: dict) -> None:
    filename = _owned(fn)
    if filename is None:
        return
    try:
        signature = inspect.signature(fn)
        bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k in signature.parameters})
        bound.apply_defaults()
    except TypeError:  # the launch itself is wrong; the interpreter reports it to the learner
        return
    arguments = {name: describe(value, name in constexprs) for name, value in bound.arguments.items()}
    options = {k: v for k, v in kwargs.items() if k in OPTIONS and isinstance(v, int) and not isinstance(v, bool)}
    key = (filename, fn.__name__, tuple((name, specialization(kind)) for name, kind in arguments.items()),
           tuple(sorted(options.items())))
    with _LOCK:
        launches = _STATE["launches"]
        if key in launches:
            launches[key]["calls"] += 1
            return
        if sum(r["kernel"] == fn.__name__ and r["file"] == filename for r in launches.values()) >= KEPT_PER_KERNEL:
            return
        launches[key] = {"kernel": fn.__name__, "module": fn.__module__, "file": filename, "arguments": arguments,
                         "options": options, "calls": 1}


def folder_of(target) -> Path | None:
    """The folder of a target module's own files (a package's folder, e.g. kernels/ for ``lora_lab.kernels``)."""
    filename = getattr(target, "__file__", None)
    return Path(filename).parent if filename else None
