"""Reading a compiled kernel: ptxas's resource report and the SASS of its hottest loop.

Why
---
The kernels have to be judged before a GPU runs them. Two things ptxas and the
disassembler tell us from a cubin alone:

- *Resources.* ``ptxas -v`` reports the registers per thread, the bytes spilled
  to local memory (a spill in the K loop turns a register access into a memory
  round trip), and warnings such as "wgmma serialized", which mean the tensor
  cores wait on ordinary instructions.
- *The instruction mix of the K loop.* A fused NF4 matmul spends its issue slots
  on decoding 4-bit codes as well as on MMA. Counting the SASS instructions in the
  loop body, by class, says how many instructions each weight costs and whether
  the tensor cores or the instruction issue bound the loop.
- *The shared-memory traffic of the K loop.* Each thread's bytes moved by the
  instructions that read or write shared memory (``LDS``/``STS``, ``LDSM``/``STSM``,
  and ``LDGSTS``, the asynchronous copy from global memory that Triton's pipeline
  stages loads through). A plain bf16 matmul moves each weight through shared
  memory once (2 bytes written by the copy; the tensor cores' own reads are not
  instructions and are not counted); a decode that stages a lookup table or its
  decoded tile there moves several times that, which is shared-memory bandwidth
  the MMA's operands need.

The loop body is found the way a reader of the SASS finds it: a backward branch
(``BRA`` to a lower address) closes a loop; the innermost loop that contains
an MMA instruction is the K loop.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

# SASS opcode (the mnemonic before its first '.') -> class. Anything else is "other".
_CLASSES = {
    "mma": ("HGMMA", "HMMA", "IMMA", "WGMMA", "UTCHMMA", "UTCQMMA"),
    "memory": ("LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "LDGDEPBAR", "LD", "ST", "LDL", "STL", "ATOM",
               "RED", "UTMALDG", "UBLKCP", "LDC", "ULDC"),
    "integer": ("IADD3", "IADD", "VIADD", "IMAD", "IMUL", "LOP3", "LOP", "SHF", "SHL", "SHR", "LEA", "ISETP", "SEL",
                "PRMT", "IABS", "IMNMX", "VIMNMX", "BFE", "BFI", "BMSK", "FLO", "POPC", "UIADD3", "UIMAD", "ULOP3",
                "USHF", "ULEA", "UISETP", "USEL", "UPRMT", "UFLO", "UPOPC", "UBMSK", "PLOP3", "UPLOP3", "P2R", "R2P"),
    "convert": ("F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "I2I", "I2IP"),
    "float": ("FADD", "FMUL", "FFMA", "FSEL", "FSETP", "FMNMX", "HADD2", "HMUL2", "HFMA2", "HSETP2", "HMNMX2", "FCHK",
              "MUFU", "DADD", "DMUL", "DFMA"),
    "move": ("MOV", "UMOV", "S2R", "S2UR", "CS2R", "R2UR", "SHFL", "MOVM"),
    "sync": ("BAR", "WARPGROUP", "WARPSYNC", "DEPBAR", "SYNCS", "MEMBAR", "FENCE", "ARRIVES", "UCGABAR", "ELECT"),
    "control": ("BRA", "EXIT", "NOP", "BSYNC", "BSSY", "CALL", "RET", "YIELD", "JMP", "BREAK", "ACQBULK", "ENDCOLLECTIVE"),
}
_CLASS_OF = {opcode: name for name, opcodes in _CLASSES.items() for opcode in opcodes}
_SHARED = ("LDS", "STS", "LDSM", "STSM", "LDGSTS")  # the instructions that read or write shared memory
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)([.A-Z0-9_]*)\s*([^;]*);")


@dataclass
class PtxasReport:
    """What ``ptxas -v`` says about one kernel."""

    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    warnings: list[str] = field(default_factory=list)


def parse_ptxas_log(log: str) -> PtxasReport:
    """Registers, spills and warnings from a ptxas ``-v`` log (one entry function)."""
    registers = re.findall(r"Used (\d+) registers", log)
    stores = re.findall(r"(\d+) bytes spill stores", log)
    loads = re.findall(r"(\d+) bytes spill loads", log)
    if not registers:
        raise ValueError(f"no 'Used N registers' line in the ptxas log:\n{log}")
    # Warnings, and numbered advice such as "(C7515) Potential Performance Loss: wgmma.mma_async instructions are
    # serialized", which ptxas (ptxas-blackwell in Triton 3.9) prints at the info level.
    warnings = [line.split(":", 1)[1].strip() for line in log.splitlines()
                if line.startswith("ptxas") and re.match(r"ptxas\S*\s+(warning\s*:|info\s*:\s*\(C\d+\))", line)]
    return PtxasReport(int(registers[-1]), sum(map(int, stores)), sum(map(int, loads)), warnings)


def run_ptxas(ptx: str, arch: str, fp_fusion: bool) -> PtxasReport:
    """Assemble ``ptx`` for ``arch`` (e.g. ``sm_90a``) with the ptxas inside the triton wheel; the report of ``-v``."""
    from triton import knobs

    blackwell = arch.startswith("sm_1") and hasattr(knobs.nvidia, "ptxas_blackwell")
    tool = knobs.nvidia.ptxas_blackwell if blackwell else knobs.nvidia.ptxas
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        flags = ["-lineinfo", "-v", f"--gpu-name={arch}"] + ([] if fp_fusion else ["--fmad=false"])
        done = subprocess.run([tool.path, *flags, source, "-o", os.path.join(folder, "kernel.cubin")],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}:\n{done.stderr}")
    return parse_ptxas_log(done.stderr)


def disassemble(cubin: bytes) -> str:
    """The SASS of a cubin, from the cuobjdump inside the triton wheel."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass failed:\n{done.stderr}")
    return done.stdout


@dataclass
class LoopMix:
    """SASS instructions of one trip through a kernel's K loop, by class (per warp)."""

    counts: dict[str, int]
    opcodes: dict[str, int]
    shared_bytes: int = 0  # bytes one thread moves to or from shared memory in one trip (see shared_access_bytes)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def share(self, kind: str) -> float:
        return self.counts.get(kind, 0) / max(self.total, 1)


def shared_access_bytes(opcode: str, modifiers: str) -> int:
    """Bytes one thread moves to or from shared memory with this instruction (0 for any other instruction).

    ``LDS``/``STS``/``LDGSTS`` move 4 bytes, or the width their modifiers name (``.U8`` 1, ``.64`` 8, ``.128`` 16);
    ``LDSM``/``STSM`` move 8x8 matrices of 16-bit elements, 128 bytes each for the warp, ``.M88.N`` of them.
    """
    if opcode not in _SHARED:
        return 0
    parts = modifiers.split(".")
    if opcode in ("LDSM", "STSM"):
        count = next((int(p) for p in reversed(parts) if p in ("1", "2", "4")), 1)
        return 4 * count
    widths = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
    return next((widths[p] for p in reversed(parts) if p in widths), 4)


def k_loop_mix(sass: str) -> LoopMix | None:
    """The instruction mix of the K loop: the innermost loop with the most MMAs; None if no loop holds one."""
    instructions = [(int(address, 16), opcode, modifiers, operands)
                    for address, opcode, modifiers, operands in _INSTRUCTION.findall(sass)]
    loops = []  # (first address, back edge's address, body) of each loop that holds an MMA
    for address, opcode, _, operands in instructions:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode == "BRA" else None
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            body = [(op, mods) for a, op, mods, _ in instructions if start <= a <= address]
            if any(_CLASS_OF.get(op) == "mma" for op, _ in body):
                loops.append((start, address, body))
    if not loops:
        return None
    # Innermost loops (no other MMA loop inside), and of those the one with the most MMAs: the K loop over W. A
    # kernel may hold a second, lighter MMA loop (Triton 3.6 makes the small-M kernel's x @ A^T sum one), which the
    # shortest-loop rule took for the K loop (0.72 instructions per weight instead of 6.9).
    innermost = [loop for loop in loops
                 if not any(o is not loop and loop[0] <= o[0] and o[1] <= loop[1] for o in loops)]
    mmas = lambda loop: sum(_CLASS_OF.get(op) == "mma" for op, _ in loop[2])  # noqa: E731
    body = max(innermost, key=lambda loop: (mmas(loop), -len(loop[2])))[2]
    opcodes = collections.Counter(op for op, _ in body)
    counts = collections.Counter()
    for opcode, n in opcodes.items():
        counts[_CLASS_OF.get(opcode, "other")] += n
    return LoopMix(dict(counts), dict(opcodes), sum(shared_access_bytes(op, mods) for op, mods in body))


def mma_kind(ptx: str) -> str:
    """Which tensor-core instruction the PTX uses: wgmma (Hopper), mma (Ampere and later), or none (FMA)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "none"


def rounds_to_tf32(ptx: str) -> bool:
    """Whether a tensor-core MMA in the PTX takes TF32 operands: fp32 values rounded to a 10-bit mantissa.

    Exact for values upcast from fp16 or bf16 (their mantissas fit), a loss of precision for fp32 inputs: Triton 3.6
    turns ``tl.sum(a[:, :, None] * b[None, :, :], axis=1)`` into a TF32 ``tt.dot`` even where the kernel's own dots
    are IEEE (3.9 keeps the FMAs).
    """
    return bool(re.search(r"(?:wgmma\.mma_async|mma\.sync)\S*\.tf32\b", ptx))
