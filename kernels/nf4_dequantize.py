"""NF4 dequantization in one Triton kernel, double quantization included.

The algorithm
-------------
An NF4 weight of ``numel`` elements is a byte array holding two 4-bit codes per
byte (element ``2i`` in the high nibble of byte ``i``), one absmax per block of
``blocksize`` consecutive elements, and the 16 NF4 levels. Element ``e`` is

    value[e] = NF4_CODE[code[e]] * absmax[e // blocksize]      (fp32, then rounded once to the weight's dtype)

With double quantization the absmax is itself stored as uint8 codes into a
256-entry map, with one fp32 scale per 256 blocks and a global offset:

    absmax[b] = absmax_code[c[b]] * absmax_scale[b // 256] + absmax_offset   (rounded after * and after +)

Each program decodes ``BLOCK`` consecutive elements: for each it loads its
byte, shifts out its nibble (the high one for even elements), looks up the
level and the absmax of its block, and writes the product. Both levels of the scale hierarchy are decoded in the same
kernel, so no fp32 absmax array is ever materialized. The arithmetic is the
reference's, operation for operation, so the result is bit-identical to
``lora_lab.nf4.dequantize_nf4`` (and so to bitsandbytes' ``dequantize_4bit``).

Straight into the matmul's dtype
--------------------------------
A layer whose weight was stored from fp32 but runs in bf16 needs
``dequantize_nf4(W).to(torch.bfloat16)``: written as two steps that is a dense
fp32 copy of W, then a second pass that reads it and writes the bf16 one.
``nf4_dequantize(q, dtype=torch.bfloat16)`` writes the bf16 weight directly,
rounding each value to the weight's own dtype first and then to ``dtype``
(``common.weight_operand``), so it equals the two steps bit for bit while
writing W once, in the narrower dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lora_lab.kernels.common import (
    INTERPRETING,
    LAUNCH_OPTIONS,
    check_device,
    dtype_kind,
    load_absmax,
    load_nf4_levels,
    new_output,
    weight_arguments,
    weight_operand,
    weight_rounding,
)

from lora_lab.nf4 import VALID_BLOCKSIZES, NF4Tensor

# Elements per program. The interpreter pays per program, not per element, so it gets bigger blocks.
BLOCK = 4096 if INTERPRETING else 1024


@triton.jit
def nf4_dequantize_kernel(
    packed_ptr,  # uint8 [ceil(numel / 2)]: two codes per byte, element 2i in the high nibble
    levels_ptr,  # fp32 [16]: NF4_CODE
    absmax_ptr,  # fp32 [blocks], or uint8 [blocks] codes with DOUBLE_QUANT
    absmax_code_ptr,  # fp32 [256]: the 8-bit dynamic map (read only with DOUBLE_QUANT)
    absmax_scale_ptr,  # fp32 [ceil(blocks / 256)]: one scale per 256 blocks (read only with DOUBLE_QUANT)
    absmax_offset,  # fp32 scalar added to every decoded absmax (DOUBLE_QUANT)
    out_ptr,  # [numel] in the output dtype
    numel,  # number of weight elements
    BLOCKSIZE: tl.constexpr,  # NF4 block size, a power of two: the division below is a shift
    W_ROUND: tl.constexpr,  # rounding to the weight's own dtype before the output's (common.weight_rounding)
    OUT_KIND: tl.constexpr,  # storage kind of out (common.FP32 / FP16 / BF16)
    DOUBLE_QUANT: tl.constexpr,
    INTERPRET: tl.constexpr,  # running under Triton's interpreter (bf16 rounding is emulated)
    BLOCK: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    levels = load_nf4_levels(packed_ptr, levels_ptr, offs, mask)
    absmax = load_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, offs // BLOCKSIZE, mask, DOUBLE_QUANT)
    tl.store(out_ptr + offs, weight_operand(levels * absmax, W_ROUND, OUT_KIND, INTERPRET), mask=mask)


def nf4_dequantize(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A dense tensor of ``q.shape`` in ``dtype`` (default ``q.dtype``): ``lora_lab.nf4.dequantize_nf4(q).to(dtype)``
    bit for bit.

    One kernel launch decodes codes, the double-quantized absmax and the final
    rounding(s), so a double-quantized weight costs no extra pass over its
    statistics, and another dtype than the weight's no extra pass over W.
    """
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"expected an NF4Tensor (see lora_lab.nf4.quantize_nf4), got {type(q).__name__}")
    if q.blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"expected blocksize to be a power of two from 32 to 4096, got {q.blocksize!r}")
    blocks = -(-q.numel // q.blocksize)
    if q.packed.numel() != (q.numel + 1) // 2 or q.absmax.numel() != blocks:
        raise ValueError(
            f"NF4Tensor of shape {tuple(q.shape)} and blocksize {q.blocksize} needs {(q.numel + 1) // 2} packed bytes "
            f"and {blocks} absmax values, got {q.packed.numel()} and {q.absmax.numel()}"
        )
    dtype = q.dtype if dtype is None else dtype
    out_kind = dtype_kind(dtype)
    packed, levels, absmax, absmax_code, absmax_scale, absmax_offset = weight_arguments(q)
    check_device(packed, absmax)
    # The interpreter's own fp32 -> bf16 store mangles subnormals, so there bf16 goes through an fp32 buffer: the
    # kernel has already rounded each value to a bf16 number, and the host's cast keeps it exactly.
    via_fp32 = INTERPRETING and dtype == torch.bfloat16
    out = new_output(tuple(q.shape), torch.float32 if via_fp32 else dtype, packed.device)
    if q.numel == 0:
        return out.to(dtype)
    grid = (triton.cdiv(q.numel, BLOCK),)
    nf4_dequantize_kernel[grid](
        packed, levels, absmax, absmax_code, absmax_scale, absmax_offset, out, q.numel,
        BLOCKSIZE=q.blocksize, W_ROUND=weight_rounding(q.dtype, dtype), OUT_KIND=out_kind, DOUBLE_QUANT=q.double_quant,
        INTERPRET=INTERPRETING, BLOCK=BLOCK, **LAUNCH_OPTIONS,
    )
    return out.to(dtype) if via_fp32 else out


if __name__ == "__main__":
    # As in Triton's tutorials: check against the reference, then (on a GPU) GB/s against the reference's torch ops.
    #   python kernels/nf4_dequantize.py
    from lora_lab.nf4 import dequantize_nf4, quantize_nf4

    device = "cpu" if INTERPRETING else "cuda"
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):  # an odd numel: the last byte holds one code, the last block is short
        q = quantize_nf4(torch.randn(301, 257, dtype=dtype) * 0.02, 64, double_quant=True).to(device)
        got, want = nf4_dequantize(q), dequantize_nf4(q)
        print(f"max |triton - reference| = {(got.float() - want.float()).abs().max().item():.3g} ({dtype}, double quant); "
              f"bit-identical: {torch.equal(got, want)}")

    @triton.testing.perf_report(
        triton.testing.Benchmark(
            x_names=["N"], x_vals=[1024, 4096, 8192, 14336], line_arg="provider", line_vals=["triton", "torch"],
            line_names=["one kernel (Triton)", "reference (torch ops)"], ylabel="GB/s",
            plot_name="nf4-dequantize-Nx4096-bf16", args={"K": 4096},
        )
    )
    def benchmark(N: int, K: int, provider: str) -> float:
        q = quantize_nf4(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, 64, double_quant=True)
        run = (lambda: nf4_dequantize(q)) if provider == "triton" else (lambda: dequantize_nf4(q))
        moved = q.nbytes + N * K * 2  # the NF4 codes and statistics read, the bf16 weight written
        return moved / triton.testing.do_bench(run) * 1e-6

    if INTERPRETING:
        print("GB/s need a GPU: under Triton's interpreter the kernel runs on the CPU")
    else:
        benchmark.run(print_data=True)
