"""Compile every kernel for a GPU this machine need not have, and check what ptxas reports.

    python -m lora_lab.kernels.compile.compile_check              # the full sweep (every kept config, both targets)
    python -m lora_lab.kernels.compile.compile_check --subset ci  # the representative subset CI runs
    python -m lora_lab.kernels.compile.compile_check --json out.json --no-sass  # without the K loop's instruction mix

Why
---
Triton compiles for a named GPU without one: ``triton.compile`` lowers a kernel
to PTX for a ``GPUTarget`` and the ptxas inside the triton wheel assembles it to
a cubin. What a first launch on a GPU would fail on, or run slowly because of,
is then visible on any machine:

- a compile error (an unsupported op on that architecture, a layout Triton cannot lower);
- more shared memory than the GPU has (Triton raises ``OutOfResources`` at launch);
- register spills (ptxas moves registers to local memory, inside the K loop);
- wgmma serialized (ptxas' advice C7515: the tensor cores wait for each MMA in turn, see sass.py);
- fp32 inputs rounded to TF32 by a tensor-core MMA (a Triton may turn a broadcast multiply and sum into one);
- the MMA kind: ``wgmma`` on Hopper (sm_90a), ``mma.sync`` on Ampere (sm_80);
- with ``--sass`` (the default), the K loop's cost per decoded weight: its SASS instructions, all and integer (the
  issue slots decoding takes), and the bytes its instructions move through shared memory (see sass.py). These are
  reported, not judged: what a kernel can afford depends on its M.

How
---
The kernels are compiled with exactly what the launchers pass. Each launcher
(``qlora_forward``, ``qlora_grad_input``, ``qlora_small_m_forward``, ``nf4_dequantize``) is
called on CPU tensors of a real layer's shape with its kernels replaced by recorders; the
recorded arguments go through Triton's own binder (``create_function_from_signature``
and ``JITFunction._pack_args``, what ``kernel[grid](...)`` runs), which gives the
signature, the specialization (which integers are 1 or multiples of 16, which
pointers are aligned) and the constexprs. The autotuner's configs are pruned
by the kernel's own ``early_config_prune`` and each one that is kept is
compiled, for fp32, fp16 and bf16, NF4 blocksizes 64 and 128, sm_90a and sm_80, and every kernel
with an adapter (all but the dequantize kernel) at LoRA ranks 16 and 64.

Triton decides when a kernel is defined whether it is interpreted, so without
a GPU this module re-runs itself in a child process with ``TRITON_INTERPRET=0``
and ``LORA_LAB_COMPILE_ONLY=1``.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import json
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch
from lora_lab.kernels.compile.launches import (
    NO_ADAPTER,
    RANKS,
    SHAPE,
    Launch,
    describe_launch,
    kept_configs,
    parse_config,
    record_launches,
)

# Shared memory one block may use (opt-in maximum), bytes: H100/H200 227 KiB, A100 163 KiB.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
ARCHS = {"sm_90a": 90, "sm_80": 80}


@dataclass
class CompileResult:
    """What compiling one launch, with one config, for one target gives."""

    kernel: str
    config: str
    dtype: str
    blocksize: int
    arch: str
    registers: int = 0
    spill_bytes: int = 0
    shared: int = 0
    shared_limit: int = 0
    mma: str = ""
    warnings: tuple = ()
    error: str = ""
    seconds: float = 0.0
    threads: int = 0
    weights_per_trip: int = 0  # NF4 weights one trip through the K loop decodes (BLOCK_N x BLOCK_K)
    loop_mix: dict | None = None  # SASS instructions per warp in one K-loop trip, by class (only with sass=True)
    loop_opcodes: dict | None = None
    loop_shared_bytes: int = 0  # bytes a thread moves to or from shared memory in one K-loop trip (sass.LoopMix)
    rank: int = 0  # the LoRA rank r the launch was recorded with
    tf32: bool = False  # a tensor-core MMA takes TF32 operands (sass.rounds_to_tf32)

    def per_weight(self, *kinds: str) -> float:
        """Instructions of these classes per decoded weight, counted per thread (a warp instruction is 32 of them)."""
        if not self.loop_mix or not self.weights_per_trip:
            return float("nan")
        count = sum(self.loop_mix.get(k, 0) for k in kinds) if kinds else sum(self.loop_mix.values())
        return count * self.threads / self.weights_per_trip

    def shared_per_weight(self) -> float:
        """Bytes moved to or from shared memory by the K loop's instructions, per decoded weight (see sass.py)."""
        if not self.loop_mix or not self.weights_per_trip:
            return float("nan")
        return self.loop_shared_bytes * self.threads / self.weights_per_trip

    @property
    def serialized(self) -> bool:
        """ptxas serialized the wgmma instructions (C7515): each waits for the one before, a Hopper kernel's main loss."""
        return any("serialized" in warning for warning in self.warnings)

    @property
    def rounds_fp32(self) -> bool:
        """fp32 inputs go through a TF32 tensor-core MMA: products with 10-bit mantissas, not fp32's tolerance."""
        return self.tf32 and self.dtype == "float32"

    @property
    def problems(self) -> list[str]:
        """Why this compile fails the check: an error, spills, serialized wgmma, more shared memory than the GPU has,
        or fp32 inputs rounded to TF32."""
        found = [f"compile error: {self.error}"] if self.error else []
        if self.spill_bytes:
            found.append(f"{self.spill_bytes} bytes of register spills")
        if self.serialized:
            found.append("wgmma serialized (ptxas C7515)")
        if self.shared > self.shared_limit:
            found.append(f"{self.shared} bytes of shared memory, over the {self.shared_limit} the GPU has")
        if self.rounds_fp32:
            found.append("fp32 inputs rounded to TF32 by a tensor-core MMA")
        return found


def compile_bound(jit, args: tuple, kwargs: dict, arch: str):
    """``jit`` compiled for ``arch`` with ``args`` and ``kwargs`` bound by Triton's own binder, as ``kernel[grid](...)``
    binds them: the compiled kernel and ptxas' report (registers, spills, warnings).

    The compile check's way, and the grader's (``conformance.grading.compile_process``, for a learner's kernels).
    Compiled even when Triton's cache has it, so that ptxas prints its log; a Triton that prints none is read by
    assembling the PTX once more.
    """
    import triton
    from lora_lab.kernels.compile.sass import parse_ptxas_log, run_ptxas
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", ARCHS[arch], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    saved = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    try:
        report = parse_ptxas_log(log.getvalue())
    except ValueError:  # a Triton that does not print the log: assemble the PTX once more to read it
        report = run_ptxas(compiled.asm["ptx"], arch, options.enable_fp_fusion)
    return compiled, report


def compile_launch(launch: Launch, config, arch: str, sass: bool = False) -> CompileResult:
    """Compile ``launch`` with ``config`` for ``arch`` through Triton's own binder, as ``kernel[grid](...)`` would."""
    from lora_lab.kernels.compile.sass import mma_kind, rounds_to_tf32
    from triton.runtime.jit import JITFunction

    capability = ARCHS[arch]
    jit = launch.kernel
    while not isinstance(jit, JITFunction):  # an Autotuner (or heuristics) wraps the JITFunction in .fn
        jit = jit.fn
    kwargs = dict(launch.kwargs, **(config.all_kwargs() if config is not None else {}))
    result = CompileResult(launch.name, describe_launch(launch, config), str(launch.dtype).removeprefix("torch."),
                           launch.blocksize, arch, shared_limit=SMEM_LIMIT[capability], rank=launch.rank)
    start = time.perf_counter()
    try:
        compiled, report = compile_bound(jit, launch.args, kwargs, arch)
        ptx = compiled.asm["ptx"]
        result.registers, result.spill_bytes = report.registers, max(report.spill_stores, report.spill_loads)
        result.warnings = tuple(report.warnings)
        result.shared, result.mma, result.tf32 = compiled.metadata.shared, mma_kind(ptx), rounds_to_tf32(ptx)
        result.threads = 32 * compiled.metadata.num_warps
        tile = config.kwargs if config is not None else launch.kwargs
        if "BLOCK_N" in tile:
            result.weights_per_trip = tile["BLOCK_N"] * tile["BLOCK_K"]
        if sass:
            from lora_lab.kernels.compile.sass import disassemble, k_loop_mix

            mix = k_loop_mix(disassemble(compiled.asm["cubin"]))
            if mix is not None:
                result.loop_mix, result.loop_opcodes, result.loop_shared_bytes = mix.counts, mix.opcodes, mix.shared_bytes
    except Exception as error:  # noqa: BLE001 - every failure to compile is a finding to report, not a crash
        result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    result.seconds = time.perf_counter() - start
    return result


# The representative subset CI compiles: bf16, blocksize 64, both targets, both ranks; for the two NF4 matmul kernels
# the default config and the last kept one, for the small-M kernel, its reduction and the dequantize kernel the one their
# launchers pass. fp16 and blocksize 128 are the same code with other constants, which the full sweep covers; fp32 is other
# code (no tensor cores), which CI compiles as well with ``--subset ci --dtype float32``.
CI_SUBSET = {"dtypes": (torch.bfloat16,), "blocksizes": (64,), "configs": "ends"}


def sweep(dtypes=(torch.float32, torch.float16, torch.bfloat16), blocksizes=(64, 128), archs=tuple(ARCHS),
          configs: str | list = "all", kernels: tuple[str, ...] = (), sass: bool = False, shape: dict = SHAPE,
          progress=None, ranks: tuple[int, ...] = RANKS, jobs: int = 1) -> list[CompileResult]:
    """Compile every (launch, kept config, target), the kernels with an adapter once per rank of ``ranks``.

    ``configs``: "all" (every config the pruning keeps), "ends" (its first and last), or a list of
    triton.Config to compile instead (for the matmul kernels; the dequantize kernel has none). ``jobs`` > 1
    compiles in that many forked processes (ptxas and Triton's passes use one core each).
    """
    global _JOBS
    _JOBS = []
    for dtype in dtypes:
        for blocksize, rank in ((b, r) for b in blocksizes for r in ranks):
            for launch in record_launches(dtype, blocksize, dict(shape, r=rank)):
                if kernels and not any(launch.name == p or fnmatch.fnmatchcase(launch.name, p) for p in kernels):
                    continue
                if rank != ranks[0] and launch.name in NO_ADAPTER:
                    continue  # the rank changes none of its arguments
                kept = kept_configs(launch, configs if isinstance(configs, list) else None)
                if configs == "ends":  # the default and the largest config of the NF4 kernels; variants: the default
                    kept = list({id(c): c for c in (kept[0], kept[-1] if "[" not in launch.name else kept[0])}.values())
                _JOBS += [(launch, config, arch, sass) for config in kept for arch in archs]
    results = []
    with contextlib.ExitStack() as stack:
        if jobs > 1 and len(_JOBS) > 1:
            # A worker that dies (a crash in ptxas' caller) breaks the pool with an error, where a Pool would hang.
            pool = stack.enter_context(ProcessPoolExecutor(min(jobs, len(_JOBS)), multiprocessing.get_context("fork")))
            compiled = pool.map(_compile_job, range(len(_JOBS)))
        else:
            compiled = map(_compile_job, range(len(_JOBS)))
        for result in compiled:
            results.append(result)
            if progress:
                progress(result)
    return results


_JOBS: list[tuple] = []  # sweep's (launch, config, arch, sass), which forked workers read by index


def _compile_job(index: int) -> CompileResult:
    return compile_launch(*_JOBS[index])


def format_row(r: CompileResult) -> str:
    status = "FAIL " + "; ".join(r.problems) if r.problems else "ok"
    per_weight = ""
    if r.loop_mix:
        m = r.loop_mix
        per_weight = (f"\n    K loop per warp: {sum(m.values())} instructions, {m.get('integer', 0)} integer, "
                       f"{m.get('mma', 0)} mma, {m.get('memory', 0)} memory, {m.get('convert', 0)} convert, "
                       f"{m.get('float', 0)} float; per weight: {r.per_weight('integer'):.2f} integer, "
                       f"{r.per_weight():.2f} in all, {r.shared_per_weight():.2f} bytes of shared memory traffic")
    return (f"{r.kernel:<34} {r.config:<20} {r.dtype:<9} {r.blocksize:>4} {r.rank:>3} {r.arch:<7} {r.registers:>4} "
            f"{r.spill_bytes:>6} "
            f"{r.shared:>7}/{r.shared_limit:<6} {r.mma:<6} {r.seconds:>5.1f}s  {status}{per_weight}")


HEADER = (f"{'kernel':<34} {'config (MxNxK)':<20} {'dtype':<9} {'bs':>4} {'r':>3} {'arch':<7} {'regs':>4} {'spill':>6} "
          f"{'smem bytes':>14} {'mma':<6} {'time':>6}  status")


def per_weight_fields(r: CompileResult) -> dict:
    """Per decoded weight, the K loop's SASS instructions (all, and integer) and its shared-memory bytes (None without
    SASS or a K loop)."""
    known = bool(r.loop_mix and r.weights_per_trip)
    return {"instructions_per_weight": round(r.per_weight(), 3) if known else None,
            "integer_per_weight": round(r.per_weight("integer"), 3) if known else None,
            "shared_bytes_per_weight": round(r.shared_per_weight(), 3) if known else None}


def _reexec_compiled(argv: list[str]) -> int:
    """Run this module again in a child whose kernels are defined compiled (the interpreter cannot compile)."""
    env = dict(os.environ, TRITON_INTERPRET="0", LORA_LAB_COMPILE_ONLY="1", LORA_LAB_AUTOTUNE="1")
    return subprocess.call([sys.executable, "-m", "lora_lab.kernels.compile.compile_check", *argv], env=env)


def main(argv: list[str] | None = None) -> int:
    """Print one row per compile; exit 1 if any compile errs, spills, serializes wgmma or needs more shared memory."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m lora_lab.kernels.compile.compile_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", choices=("all", "ci"), default="all", help="ci: the representative subset CI runs")
    parser.add_argument("--arch", action="append", choices=tuple(ARCHS), help="a target (repeatable; default both)")
    parser.add_argument("--kernel", action="append", help="only kernels matching this name or 'pattern*' (repeatable)")
    parser.add_argument("--config", action="append",
                        help="compile this MxNxK:warps:stages instead of the project's configs (BLOCK_K | blocksize)")
    parser.add_argument("--dtype", action="append", choices=("float32", "float16", "bfloat16"),
                        help="only this dtype (repeatable)")
    parser.add_argument("--blocksize", action="append", type=int, choices=(64, 128), help="only this NF4 blocksize")
    parser.add_argument("--rank", action="append", type=int, help=f"only this LoRA rank r (repeatable; default {RANKS})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile in this many processes")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--sass", action=argparse.BooleanOptionalAction, default=True,
                        help="disassemble and report the K loop's instructions and shared-memory bytes per weight "
                        "(default; --no-sass is faster)")
    args = parser.parse_args(argv)
    from lora_lab.kernels import common

    if common.INTERPRETING:
        return _reexec_compiled(argv)
    import triton

    chosen = dict(CI_SUBSET) if args.subset == "ci" else {"dtypes": (torch.float32, torch.float16, torch.bfloat16),
                                                          "blocksizes": (64, 128), "configs": "all"}
    ranks = tuple(args.rank or RANKS)
    print(f"triton {triton.__version__}, torch {torch.__version__}; layer {SHAPE}, r in {ranks}; subset {args.subset}")
    print(HEADER)
    start = time.perf_counter()
    if args.dtype:
        chosen["dtypes"] = tuple(getattr(torch, name) for name in args.dtype)
    if args.blocksize:
        chosen["blocksizes"] = tuple(args.blocksize)
    if args.config:
        chosen["configs"] = [parse_config(text) for text in args.config]
    results = sweep(chosen["dtypes"], chosen["blocksizes"], tuple(args.arch or ARCHS), chosen["configs"],
                    tuple(args.kernel or ()), args.sass, progress=lambda r: print(format_row(r), flush=True), ranks=ranks,
                    jobs=args.jobs)
    failed = [r for r in results if r.problems]
    print(f"{len(results)} compiles in {time.perf_counter() - start:.0f}s: {len(failed)} fail "
          f"({sum(bool(r.error) for r in failed)} errors, {sum(r.spill_bytes > 0 for r in failed)} spill, "
          f"{sum(r.serialized for r in failed)} wgmma serialized, {sum(r.shared > r.shared_limit for r in failed)} over "
          f"shared memory, {sum(r.rounds_fp32 for r in failed)} fp32 rounded to TF32)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"problems": r.problems, "serialized": r.serialized} | per_weight_fields(r)
                       for r in results], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
