"""Compiling the kernels for a GPU this machine need not have: tooling beside the kernels, not a kernel.

- ``compile_check.py``: every kernel compiled for sm_90a and sm_80 with the arguments its launcher passes, and
  ptxas's verdict (``python -m lora_lab.kernels.compile.compile_check``).
- ``launches.py``: the launches it compiles, recorded from each launcher on a real layer's shape.
- ``sass.py``: reading a cubin: ptxas's resource report and the instruction mix of the K loop.
- ``specializations.py``: how many kernels the GPU test steps compile (Triton's cache keys, counted without a GPU),
  and whether each step's compiling fits its time (``python -m lora_lab.kernels.compile.specializations``).
"""
