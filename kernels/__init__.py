"""Fused Triton kernels for QLoRA, imported as ``lora_lab.kernels`` (never as a top-level ``kernels``).

- ``nf4_dequantize(q)``: one kernel, double quantization included; bit-identical
  with ``lora_lab.nf4.dequantize_nf4``.
- ``fused_qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None)``: the
  contract of ``lora_lab.lora.qlora_linear``, with W decoded tile by tile in
  registers and the LoRA path fused into the same matmul, forward and backward.

``qlora_linear`` and ``dequantize_nf4`` are aliases, so this module is a target
for the conformance suite: ``lora-lab verify lora_lab.kernels``.

Without a CUDA device the kernels run under Triton's interpreter: importing
this package sets ``TRITON_INTERPRET=1`` (unless you set it) before Triton is
imported, see ``common.py``.
"""

import sys
from importlib.machinery import PathFinder
from importlib.util import module_from_spec
from pathlib import Path


def _import_hugging_face_kernels() -> None:
    """Stand aside for Hugging Face's ``kernels`` package when this folder is imported under that name.

    Python run from the repository root (``python -c``, ``python -m``, a REPL, a notebook) has the root on
    ``sys.path`` first, so ``import kernels`` finds this folder before site-packages. transformers 5 imports Hugging
    Face's ``kernels`` (``from kernels import CUDAProperties``), so a folder that merely stayed empty under that name
    broke ``import peft``. Instead this module loads the real package from the rest of ``sys.path`` and puts it in
    ``sys.modules["kernels"]``, which is what the ``import`` statement returns.
    """
    our_root = Path(__file__).resolve().parent.parent
    elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != our_root]
    spec = PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError(
            "No module named 'kernels' (Hugging Face's package is not installed; the folder kernels/ in "
            f"{our_root} is lora_lab's Triton kernels: import it as lora_lab.kernels)",
            name="kernels",
        )
    hugging_face_kernels = module_from_spec(spec)
    sys.modules["kernels"] = hugging_face_kernels
    try:
        spec.loader.exec_module(hugging_face_kernels)
    except BaseException:
        sys.modules.pop("kernels", None)
        raise


if __name__ == "kernels":
    _import_hugging_face_kernels()
else:
    from lora_lab.kernels.common import INTERPRETING
    from lora_lab.kernels.fused_qlora_linear import fused_qlora_linear
    from lora_lab.kernels.nf4_dequantize import nf4_dequantize

    # The conformance suite finds operations by their reference names.
    qlora_linear = fused_qlora_linear
    dequantize_nf4 = nf4_dequantize

    __all__ = ["INTERPRETING", "dequantize_nf4", "fused_qlora_linear", "nf4_dequantize", "qlora_linear"]
