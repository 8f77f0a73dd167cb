"""Exercise 07: NF4 dequantization as a Triton kernel.

Lecture step 1, the forward pass, made fast. Every forward (and backward) pass
of a QLoRA layer turns the 4-bit weight back into numbers. In torch that is
several passes over memory (unpack, look up, repeat the absmax, multiply,
cast), each reading and writing a full-size tensor. One kernel reads the
packed bytes once and writes each value once. This exercise is that kernel;
exercise 08 then decodes the weight inside the matmul, so it never reaches memory.

Triton in one paragraph
-----------------------
A Triton kernel is a Python function decorated with ``@triton.jit`` that runs
once per *program*; ``tl.program_id(0)`` says which. Each program works on a
block of ``BLOCK`` elements at once: ``offs = pid * BLOCK + tl.arange(0, BLOCK)``
is a vector of indices, ``tl.load(ptr + offs, mask=offs < n)`` reads a vector
from memory (the mask keeps the last program inside the tensor), arithmetic is
elementwise on vectors, and ``tl.store(ptr + offs, values, mask=...)`` writes.
The host launches ``kernel[grid](tensors..., numbers..., CONSTANTS=...)`` with
``grid = (triton.cdiv(n, BLOCK),)`` programs; tensors arrive as pointers.
Without a GPU, Triton's *interpreter* runs the same kernel on the CPU with numpy
(slowly, and exactly): that is how this exercise is graded, everywhere.

The algorithm (exercise 01's format)
------------------------------------
For element ``e`` of the flattened weight:

    byte  = packed[e // 2]
    code  = byte >> 4 if e is even else byte & 0x0F          element 2i is the HIGH nibble
    value = NF4_CODE[code] * absmax[e // blocksize]           in fp32

then the host rounds the fp32 result to the weight's dtype once:
``out.to(q.dtype).reshape(q.shape)``. (Rounding inside the kernel is possible on
a GPU, but the interpreter truncates instead of rounding when it casts to bf16,
so round on the host here.) ``tl.where(cond, a, b)`` picks per element.

The spec
--------
``dequantize_nf4(q: NF4Tensor) -> Tensor`` of ``q.shape`` and ``q.dtype``, equal
bit for bit to ``lora_lab.nf4.dequantize_nf4(q)`` (and so to bitsandbytes), for
any numel, every block size from 32 to 4096, and double-quantized weights: pass
``q.absmax_fp32()`` to the kernel (it decodes double quantization on the host).
Stretch (not graded separately): decode the double-quantized absmax inside the
kernel too, ``absmax_code[c] * absmax_scale[block // 256] + absmax_offset``.

The grader passes CPU tensors and runs Triton under its interpreter
(``TRITON_INTERPRET=1``, set below when there is no GPU and by ``lora-lab grade``).
One graded weight is past 2^24 elements (``nf4.dequantize_realistic_size``, 12
points), where float32 can no longer count every element: compute indices in
integers. To keep it quick, the grader first runs only the programs of your
grid's last part (program p writing the p-th BLOCK, as above) and compares their
elements; if they are wrong it runs the whole grid before taking any points off.
The interpreter runs code a GPU would refuse, so the last check
(``triton.compiles_for_gpu``, 4 points) also compiles your kernel for an H100
(sm_90a) and an A100 (sm_80), with the arguments your calls launched it with; no
GPU is needed for that. A compile error costs its points and shows Triton's
message; a register spill is only a hint.

Grading: ``lora-lab grade --only 07`` (or ``python exercises/ex07_triton_dequant.py``).

The reference solution is kernels/nf4_dequantize.py (``lora_lab.kernels.nf4_dequantize``),
with its helpers in kernels/common.py. Try first!
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must be set before any @triton.jit below runs (as lora_lab.kernels does)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lora_lab.nf4 import NF4_CODE, NF4Tensor  # noqa: E402, F401

BLOCK = 1024  # elements per program: a power of two (tl.arange needs one), even (whole bytes)


@triton.jit
def nf4_dequantize_kernel(
    packed_ptr,  # uint8 [ceil(numel / 2)]: two codes per byte, element 2i in the high nibble
    levels_ptr,  # fp32 [16]: NF4_CODE
    absmax_ptr,  # fp32 [ceil(numel / blocksize)]: one absmax per NF4 block (decoded)
    out_ptr,  # fp32 [numel]: the dequantized values, before rounding to the weight's dtype
    numel,  # number of weight elements
    BLOCKSIZE: tl.constexpr,  # NF4 block size
    BLOCK: tl.constexpr,  # elements per program
):
    # TODO (exercise 07): the element indices of this program, their bytes, codes, levels and absmax; store the values.
    pass


def dequantize_nf4(q: NF4Tensor) -> torch.Tensor:
    """A dense tensor of ``q.shape`` and ``q.dtype``, computed by ``nf4_dequantize_kernel``.

    Allocate an fp32 output of ``q.numel`` elements on ``q.packed.device``, put
    ``NF4_CODE`` and ``q.absmax_fp32()`` on that device too, launch one program
    per ``BLOCK`` elements, and round once on the host.
    """
    raise NotImplementedError("exercise 07: launch nf4_dequantize_kernel from dequantize_nf4")


if __name__ == "__main__":  # python exercises/ex07_triton_dequant.py grades this file alone
    from lora_lab.conformance.grading.command import main

    raise SystemExit(main(["--only", "07", "--path", os.path.dirname(os.path.abspath(__file__))]))
