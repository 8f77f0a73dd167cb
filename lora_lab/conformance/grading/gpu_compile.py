"""A Triton exercise's kernel must compile for a GPU: the check that compiles what the interpreter ran.

The Triton exercises are graded under Triton's interpreter, which runs kernels no GPU would accept: a fused forward
whose adapter ``tl.dot`` has K = 4 (the rank padded to 4 rather than 16) computes the right numbers on the CPU, and
Triton refuses to compile it for sm_90 ("K >= 8"). So the last check of exercises 07 and 08 compiles the learner's
own kernels for sm_90a (H100) and sm_80 (A100), with exactly the arguments the checks launched them with:

1. it calls the learner's op once on a small fixed case and holds it to the same oracle as the other checks (a
   kernel that computes nothing compiles too; the points are for a kernel that works and compiles), which also
   launches it at a rank under 16 whatever the drawn checks before it launched;
2. it asks the target's process for every distinct launch of the file's own kernels so far (and of lora_lab's, which
   only the suite's own tests and ``--solutions`` launch: ``isolation.kernel_launches`` recorded them, with the dtypes,
   alignment, integer specializations, constexprs and launch options Triton compiles on);
3. it picks a few per kernel (``choose``: the smallest and largest value of each constexpr first, where ``tl.dot``'s
   and shared memory's limits bite) and compiles them in a compile-only process (``compile_process``);
4. a compile error (Triton's or ptxas'), or more shared memory than the GPU has, fails the check with the compiler's
   own message trimmed to the lines that matter, and a hint for the mistakes learners make; a register spill is
   slow, not wrong: the check passes with a hint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import time

from lora_lab.conformance.errors import CheckFailed, NotSupported
from lora_lab.conformance.registry import Check

ARCHS = ("sm_90a", "sm_80")  # Hopper (H100, H200) and Ampere (A100): the GPUs QLoRA is trained on
PER_KERNEL = 2  # launches compiled per kernel: each costs 0.5 to 2 s per target on a 2-core machine
MOST = 4  # launches compiled in all (a file with many kernels: each one's first pick, then its second)
TIMEOUT = 300  # seconds for the compile-only process, which takes a few

# The mistakes that run under the interpreter and do not compile, and what to do about each.
KNOWN = (
    (re.compile(r"(M|N|K) >= (8|16)"),
     "tl.dot needs every dimension to be at least 16 (the interpreter does not check): pad the rank with "
     "R_PAD = max(16, triton.next_power_of_2(r)) and mask the loads of A and B with offs_r < R"),
    (re.compile(r"arange's range must be a power of 2|power of 2"),
     "tl.arange and block shapes must be powers of two: pad with triton.next_power_of_2 and mask the rest"),
    (re.compile(r"ptxas", re.IGNORECASE),
     "ptxas, NVIDIA's assembler, refused the code Triton made: the message above names the instruction"),
)
SHARED_HINT = ("the tiles need more shared memory than the GPU has: smaller BLOCK_M/BLOCK_N/BLOCK_K, or fewer "
               "num_stages (each stage keeps one more copy of the tiles)")
SPILL_HINT = ("ptxas spilled registers to local memory (slow, not wrong): smaller tiles, a smaller R_PAD tile kept "
              "across the K loop, or more num_warps to share the work")


def _drive_dequantize(target) -> None:
    """Exercise 07's kernel on a small double-quantized weight: bit for bit lora_lab's torch dequantize."""
    import torch

    from lora_lab.conformance.judge.compare import assert_equal, call_guarded
    from lora_lab.nf4 import dequantize_nf4, quantize_nf4

    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(7)) * 0.05
    q = quantize_nf4(weight, blocksize=64, double_quant=True)
    out = call_guarded(target.op("dequantize_nf4"), q, name="dequantize_nf4")
    assert_equal(out, dequantize_nf4(q), "dequantize_nf4 on a (40, 96) weight, blocksize 64, double quant")


def _drive_forward(target) -> None:
    """Exercise 08's kernel at a rank under 16 (r = 3), M and N off the tiles, with a bias: within the fp32 bound."""
    import torch

    from lora_lab.conformance.properties.qlora import check_forward, fixed_problem

    check_forward(target, fixed_problem(3, 64, 40, 3, torch.float32, seed=8, target=target),
                  "the case the compile check launches (r = 3)")


DRIVE = {"dequantize_nf4": _drive_dequantize, "qlora_linear": _drive_forward}


def compile_check(operation: str, exercise: str, points: int) -> Check:
    """The compile check of the Triton exercise that writes ``operation`` (not in the suite's registry: it grades
    a learner's file in the grader's process, and ``verify``'s targets have no learner's kernels to record)."""

    def compiles_for_gpu(target):
        request = getattr(target, "request", None)
        if request is None:
            raise NotSupported("the compile check reads the launches recorded in the target's own process")
        compiler = Compiler()
        try:
            DRIVE[operation](target)
            launches = request(["launches"], "the kernel launches recorded")
            if not launches:
                raise CheckFailed(f"{operation} launched no Triton kernel: the exercise is to write one")
            compilable = [r for r in launches if not any(kind[0] == "other" for kind in r["arguments"].values())]
            if not compilable:  # no verdict without a compile to stand on
                other = next(k for k in launches[0]["arguments"].values() if k[0] == "other")
                raise NotSupported(f"{launches[0]['kernel']} takes an argument of type {other[1]}, which the compile "
                                   "check cannot recreate outside your process")
            return judge(compiler.results(choose(compilable)))
        finally:
            compiler.close()

    compiles_for_gpu.__doc__ = (f"The kernels behind {operation} compile for sm_90a and sm_80 with the arguments the "
                                "checks launched them with")
    return Check("triton.compiles_for_gpu", (operation,), points, compiles_for_gpu.__doc__,
                 "A kernel must compile for a GPU, not only run under the interpreter: read the compiler's message "
                 "above, the line it points at, and the limits of tl.dot and tl.arange in Triton's docs.",
                 exercise, compiles_for_gpu)


def choose(launches: list[dict], per_kernel: int = PER_KERNEL, most: int = MOST) -> list[dict]:
    """A few launches per kernel, greedily: first those with a constexpr's smallest or largest value not yet chosen
    (a tl.dot dimension too small, a tile too large), then those with new constexpr values, in the order seen."""
    chosen: list[list[dict]] = []
    kernels = dict.fromkeys((r["file"], r["kernel"]) for r in launches)
    for kernel in kernels:
        mine = [r for r in launches if (r["file"], r["kernel"]) == kernel]
        numbers: dict[str, list] = {}
        for record in mine:
            for name, kind in record["arguments"].items():
                if kind[0] == "constexpr" and isinstance(kind[1], (int, float)) and not isinstance(kind[1], bool):
                    numbers.setdefault(name, []).append(kind[1])
        extremes = {(name, v) for name, values in numbers.items() for v in (min(values), max(values))}
        seen: set = set()
        picked: list[dict] = []
        while mine and len(picked) < per_kernel:
            gains = [(len((_constexprs(r) - seen) & extremes), len(_constexprs(r) - seen)) for r in mine]
            best = mine[gains.index(max(gains))]  # the first of equals: the order the checks launched them in
            picked.append(best)
            mine.remove(best)
            seen |= _constexprs(best)
        chosen.append(picked)
    rounds = [kernel[i] for i in range(per_kernel) for kernel in chosen if i < len(kernel)]  # each kernel's first, ...
    return rounds[:most]


def _constexprs(record: dict) -> set:
    return {(name, kind[1]) for name, kind in record["arguments"].items() if kind[0] == "constexpr"}


class Compiler:
    """The compile-only process (``compile_process``), started before the drive call so that it imports torch and
    Triton meanwhile; ``results`` sends it the launches and reads each one's result on each target as soon as they
    are written (not after the process has finished exiting). Its stderr (the target's prints) goes to a file, so a
    chatty file cannot fill a pipe nobody reads."""

    def __init__(self) -> None:
        from lora_lab.conformance.grading.compile_process import ENVIRONMENT

        self.stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "-m", "lora_lab.conformance.grading.compile_process"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                        env=dict(os.environ, **ENVIRONMENT))

    def results(self, launches: list[dict], archs: tuple[str, ...] = ARCHS) -> list[dict]:
        with contextlib.suppress(BrokenPipeError):  # it ended already: its stderr says why, below
            self.process.stdin.write(json.dumps({"launches": launches, "archs": list(archs)}).encode())
            self.process.stdin.close()
        reply, deadline = [], time.monotonic() + TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CheckFailed(f"compiling the kernels took over {TIMEOUT} s")
            if select.select([self.process.stdout], [], [], left)[0]:
                chunk = os.read(self.process.stdout.fileno(), 1 << 16)
                if not chunk:
                    break
                reply.append(chunk)
        try:
            return json.loads(b"".join(reply))
        except json.JSONDecodeError:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
            self.stderr.seek(0)
            tail = "\n".join(self.stderr.read().decode(errors="replace").strip().splitlines()[-8:])
            raise CheckFailed(f"the compile-only process ended without a result (exit status "
                              f"{self.process.returncode}):\n{tail}") from None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # the sandbox's outer process: the sandboxed one ends with it (PR_SET_PDEATHSIG)
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.stderr):
            with contextlib.suppress(OSError):  # a request never delivered to a process that had ended
                stream.close()


def compile_launches(launches: list[dict], archs: tuple[str, ...] = ARCHS) -> list[dict]:
    """Each launch compiled for each target in a compile-only process of its own: its results."""
    compiler = Compiler()
    try:
        return compiler.results(launches, archs)
    finally:
        compiler.close()


def judge(results: list[dict]) -> str:
    """Fail on the first compile error or shared memory over the limit; return a hint for spills (or "")."""
    for r in results:
        where = f"{r['kernel']} ({os.path.basename(r['file'])}) for {r['arch']}"
        if r["error"]:
            message = trim(r["error"], r["file"], r["line"])
            hints = [hint for pattern, hint in KNOWN if pattern.search(r["error"])][:1]
            raise CheckFailed(f"{where} does not compile:\n{message}" + "".join(f"\n-> {h}" for h in hints))
        if r["shared"] > r["shared_limit"]:
            raise CheckFailed(f"{where} needs {r['shared']} bytes of shared memory; the GPU has {r['shared_limit']}\n"
                              f"-> {SHARED_HINT}")
    spills = [r for r in results if r["spill_bytes"]]
    if not spills:
        return ""
    worst = max(spills, key=lambda r: r["spill_bytes"])
    return (f"hint: {worst['kernel']} compiles, and spills {worst['spill_bytes']} bytes of registers for {worst['arch']} "
            f"({worst['registers']} registers a thread): {SPILL_HINT}")


def trim(error: str, file: str, first_line: int) -> str:
    """The lines of a compiler's message that matter: the learner's line (numbered in their file), the caret under
    it, and the reason; for ptxas the lines that say error. Triton numbers a kernel's lines from its ``def``."""
    lines = [line for line in error.splitlines() if line.strip()]
    at = re.match(r"\w+Error: at (\d+):(\d+):", lines[0]) if lines else None
    if at and first_line:
        caret = next((i for i, line in enumerate(lines) if line.strip() == "^"), None)
        source = [lines[caret - 1], lines[caret]] if caret else []
        reason = lines[caret + 1:] if caret else lines[1:]
        line = first_line + int(at.group(1)) - 1
        return "\n".join([f"{os.path.basename(file)}, line {line}:", *source, *reason[-3:]])
    errors = [line for line in lines if "error" in line.lower()]
    return "\n".join((errors or lines)[:6])
