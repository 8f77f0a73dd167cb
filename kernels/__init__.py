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

# Python run from the repository root can also import this folder as a top-level `kernels`, the name of Hugging
# Face's package that transformers and bitsandbytes probe for. Under that name it stays empty and harmless.
if __name__ == "lora_lab.kernels":
    from lora_lab.kernels.common import INTERPRETING
    from lora_lab.kernels.fused_qlora_linear import fused_qlora_linear
    from lora_lab.kernels.nf4_dequantize import nf4_dequantize

    # The conformance suite finds operations by their reference names.
    qlora_linear = fused_qlora_linear
    dequantize_nf4 = nf4_dequantize

    __all__ = ["INTERPRETING", "dequantize_nf4", "fused_qlora_linear", "nf4_dequantize", "qlora_linear"]
