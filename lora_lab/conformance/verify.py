"""Run the conformance suite on your own QLoRA implementation.

TARGET is an importable module (``my_package.qlora``) or ``module:attribute``
providing any of: quantize_nf4, dequantize_nf4, qlora_linear, next_token_loss,
adamw_step, apply_qlora + training_step (signatures as in lora_lab). Checks for
operations it lacks are reported as "not provided", not as failures.

Each row gives the check's time and the time spent inside the target. The
realistic-size checks also give the target's time over lora_lab's reference's
on the same calls and hold it to a budget (50x the reference's time + 0.5 s);
at the other checks' small sizes fixed per-call costs dominate. Calls that ran
Triton's interpreter are not timed; lora-lab bench measures speed.

Exit status: 0 when every provided operation passes, 1 otherwise, 2 when the
target provides none of the operations (a mistyped module must not pass), when
every check of a provided operation was "not supported" (a declaration alone
is not a pass; the operation and the target's CAPABILITIES are named), or when
it does not import, and for a --json path that cannot be written (refused before
any check runs); 130 on Ctrl-C.

What a pass means, in three layers. (1) A separate process: the target is
imported and run only in a child process (a fork of a clean server process,
never of this one); the inputs, the oracles, the comparisons, the exit status
and this report stay in this process and exchange plain copies of tensors with
it. Closed: tampering with the suite in-process (patching its comparisons,
hypothesis or torch.testing, an atexit handler that rewrites the exit status),
reading the expected values from the suite's frames or gc.get_objects().
(2) A sandbox around that process (--sandbox, on by default): new user, pid,
mount and network namespaces and no new privileges; this process is
non-dumpable. Closed: tracing, signalling or writing the memory of the suite's
processes, writing lora_lab's files, site-packages, the exercises or the report
(all read-only; /dev/shm is the target's own tmpfs), the network, and processes
left behind (they end with the target). After the run, lora_lab's files and
site-packages' .pth and sitecustomize files are checked unchanged (exit 2 if
not). (3) Judgments here: values, and the time of each call (by this process's
clock), are decided in this process. Only observed inside the target's process,
so they catch mistakes, not a target that tampers with itself: global state,
writes to inputs, late writes to outputs, layout, what a forward keeps for
backward, Triton memory accesses under the interpreter. The checks also close
cached answers (every call gets fresh values) and crashes and hangs (a verdict
naming the call). Not closable by any test suite: code that recognises a
verification run by other means (the inputs' statistics, the machine) and
behaves differently elsewhere.
--profile scored (or --seed N) draws the inputs from a seed the target cannot
know, recorded in the report; the ci profile stays reproducible. A function
that is lora_lab's own, re-exported by the target, is flagged: those checks test
lora_lab, not the target. --json records the target's module path and the
sha256 of its source files, so a published result names the code it came from.

examples:
  lora-lab verify lora_lab                        # the reference passes every check
  lora-lab verify lora_lab.targets.peft_bnb       # peft + bitsandbytes as they are: 3 findings, exit 1
  lora-lab verify my_package.qlora --only nf4. --json runs/report.json
  lora-lab verify my_package.qlora --only nf4.,qlora.forward   # or: --only nf4. --only qlora.forward
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lora_lab.cli.arguments import output_file_problem
from lora_lab.conformance.errors import CheckFailed, NotSupported, TargetCrashed, TargetImportError, TargetTimedOut
from lora_lab.conformance.isolation import sandbox
from lora_lab.conformance.isolation.process import prepare_for_targets
from lora_lab.conformance.runner import (
    ERROR,
    FAILED,
    NOT_ATTEMPTED,
    NOT_PROVIDED,
    NOT_SUPPORTED,
    OPERATIONS,
    PASSED,
    Result,
    all_checks,
    run_check,
)

SYMBOLS = {PASSED: "PASS", FAILED: "FAIL", ERROR: "ERROR", NOT_PROVIDED: "-", NOT_SUPPORTED: "n/s", NOT_ATTEMPTED: "TODO"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="TARGET", help="importable module or module:attribute to verify")
    # One value per --only (comma-separated, repeatable), so that `--only nf4. lora_lab` leaves the target alone.
    parser.add_argument(
        "--only", action="extend", type=_prefixes, metavar="NAME[,NAME...]", default=None,
        help="run only checks whose name starts with a NAME (e.g. nf4. or nf4.,qlora.forward; repeatable); see --list",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument(
        "--profile", choices=("ci", "dev", "thorough", "scored"), default="ci",
        help="hypothesis profile: ci (derandomized, default), dev (2x examples, random), thorough (10x), "
        "scored (ci's examples from a fresh secret seed, recorded in the report)",
    )
    parser.add_argument("--seed", type=int, default=None,
                        help="draw every check's inputs from this seed (reproduces a scored run)")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    option = parser.add_argument(
        "--sandbox", choices=sandbox.MODES, default=None,
        help="the target's process in new namespaces (sandbox.py): auto (default, $LORA_LAB_SANDBOX) uses what this "
        "machine offers, require refuses to run without every layer, off runs a plain process. On this machine: "
        "%(offered)s",
    )
    option.offered = sandbox.Offered()  # probed only when the help is printed, not on every run


def _prefixes(text: str) -> list[str]:
    prefixes = [prefix.strip() for prefix in text.split(",") if prefix.strip()]
    if not prefixes:
        raise argparse.ArgumentTypeError("expected check names or prefixes, e.g. nf4. or nf4.,qlora.forward")
    return prefixes


def _select(only: list[str] | None):
    checks = all_checks()
    if not only:
        return checks
    chosen = [c for c in checks if any(c.name.startswith(prefix) for prefix in only)]
    if not chosen:
        names = ", ".join(c.name for c in checks)
        raise ValueError(f"no check matches {', '.join(only)}; the checks are: {names}")
    return chosen


def format_row(result: Result, seconds: float, width: int) -> str:
    detail = result.detail.splitlines()[0] if result.detail else result.check.description
    inside = f"{result.target_seconds:5.1f}s" if result.status != NOT_PROVIDED else " " * 6
    ratio = f"{result.slowdown:6.1f}x" if result.slowdown is not None else " " * 7
    return f"  {SYMBOLS[result.status]:<5} {result.check.name:<{width}} {seconds:5.1f}s {inside} {ratio}  {detail}"


def borrowed_operations(target) -> dict[str, str]:
    """Operations the target re-exports from lora_lab itself: ``{op: module}``; their checks test lora_lab."""
    return {op: origin["module"] or origin["file"] for op, origin in target.origin.items() if origin["lora_lab"]}


def verify(target, only: list[str] | None = None, stream=None) -> list[Result]:
    """Run the selected checks on ``target`` (a loaded target), printing one row per check as it finishes."""
    stream = stream or sys.stdout
    checks = _select(only)
    width = max(len(c.name) for c in checks)
    provided = [op for op in sorted({op for c in checks for op in c.requires}) if target.provides(op)]
    print(f"lora-lab verify {target.name}: {len(checks)} checks; provides {', '.join(provided) or 'nothing'}", file=stream)
    borrowed = borrowed_operations(target)
    if borrowed and not target.name.split(".")[0].startswith("lora_lab"):
        print(f"  note: {', '.join(sorted(borrowed))} {'is' if len(borrowed) == 1 else 'are'} lora_lab's own code, "
              f"re-exported ({', '.join(sorted(set(borrowed.values())))}): those checks test lora_lab, not {target.name}",
              file=stream)
    print(f"  {'':5} {'check':<{width}} {'total':>6} {'target':>6} {'vs ref':>7}", file=stream)
    results = []
    for check in checks:
        start = time.perf_counter()
        result = run_check(check, target)
        result.seconds = time.perf_counter() - start
        print(format_row(result, result.seconds, width), file=stream, flush=True)
        results.append(result)
    return results


def summary(results: list[Result]) -> str:
    counts = {status: sum(r.status == status for r in results) for status in SYMBOLS}
    parts = [f"{counts[PASSED]} passed", f"{counts[FAILED] + counts[ERROR]} failed"]
    if counts[NOT_ATTEMPTED]:
        parts.append(f"{counts[NOT_ATTEMPTED]} not attempted")
    if counts[NOT_SUPPORTED]:
        parts.append(f"{counts[NOT_SUPPORTED]} not supported")
    parts.append(f"{counts[NOT_PROVIDED]} not provided")
    return ", ".join(parts)


def unsupported_operations(target, results: list[Result]) -> list[str]:
    """Why an operation that ran checks has nothing to stand on: one line for each whose every check was not supported.

    A target that declares (or is probed to support) nothing a check can draw would otherwise pass with
    "0 passed, 20 not supported"; the line names the operation, the target's declarations and the first reason.
    """
    declarations = target.declaration("CAPABILITIES")
    declared = f"CAPABILITIES = {declarations!r}" if declarations else "no CAPABILITIES declared"
    lines = []
    for op in OPERATIONS:
        ran = [r for r in results if op in r.check.requires and r.status != NOT_PROVIDED]
        if ran and all(r.status == NOT_SUPPORTED for r in ran):
            lines.append(f"{op}: all {len(ran)} of its checks were not supported, so nothing of it was verified "
                         f"({declared}; {ran[0].check.name}: {ran[0].detail})")
    return lines


def group(check) -> str:
    """Where a check counts in the compatibility matrix: its conformance level, training, bad input, or its topic."""
    if check.level:
        return check.level
    if {"apply_qlora", "training_step"} & set(check.requires):
        return "training"
    return "bad input" if check.name.endswith("rejects_bad_input") else check.name.split(".")[0]


def provenance(spec: str) -> dict:
    """The target's module path and the sha256 of its source files, found without executing any package's code."""
    from lora_lab.conformance.isolation.origin import sha256_of, source_files

    files = source_files(spec.partition(":")[0])
    return {"module_path": str(files[0].parent if len(files) > 1 else files[0]) if files else None,
            "source_files": [str(f) for f in files], "sha256": sha256_of(files)}


def json_report(target, profile: str, results: list[Result], seed: int | None = None) -> dict:
    """The results with what a compatibility matrix needs: library versions, format, capabilities, a count per group."""
    from importlib import metadata

    from lora_lab.conformance.judge.formats import has_own_format, weight_format

    target_spec = target.name
    versions = {}
    for library in ("torch", *(target.declaration("LIBRARIES") or ())):
        try:
            versions[library] = metadata.version(str(library))
        except (metadata.PackageNotFoundError, ValueError):
            versions[library] = None
    own = has_own_format(target)
    layer_level = any(target.provides(op) for op in ("quantize_nf4", "dequantize_nf4", "qlora_linear"))
    summary: dict[str, dict[str, int]] = {}
    for r in results:
        counts = summary.setdefault(group(r.check), {})
        counts[r.status] = counts.get(r.status, 0) + 1
    return {
        "target": target_spec,
        **provenance(target_spec),
        "isolated": not hasattr(target, "obj"),
        "sandbox": target.hello.get("sandbox") if hasattr(target, "hello") else None,
        "origin": target.origin,
        "profile": profile,
        "seed": seed,
        "libraries": versions,
        "format": weight_format(target).name if own else "NF4Tensor (the interchange type)" if layer_level else "-",
        "capabilities": _capabilities_report(target) if own else "all (the NF4Tensor contract)",
        "summary": summary,
        "results": [
            {"check": r.check.name, "group": group(r.check), "requires": list(r.check.requires), "status": r.status,
             "detail": r.detail, "seconds": round(r.seconds, 3), "target_seconds": round(r.target_seconds, 3),
             "target_vs_reference": None if r.slowdown is None else round(r.slowdown, 2)}
            for r in results
        ],
    }


def _capabilities_report(target) -> dict | str:
    """What the target's own format supports, or why it has nothing to report (QLoRA's own case declared away, say)."""
    from lora_lab.conformance.judge.formats import capabilities

    try:
        return capabilities(target).report()
    except (CheckFailed, NotSupported) as exc:
        return str(exc)


def import_failure(spec: str, exc: BaseException) -> str:
    """The one line that says why the target was not checked: what it raised or did while importing, or the suite's words.

    The suite's own refusals (no such module, no such attribute, no such check) come back with no frame of the
    target's in their traceback, and already name what is wrong; anything else was the target's code, importing.
    """
    module = spec.partition(":")[0]
    if isinstance(exc, (TargetCrashed, TargetTimedOut)):  # its process died or hung while importing it
        return f"error while importing {module}: {exc}"
    if not isinstance(exc, TargetImportError):
        return str(exc)
    kind = exc.info.get("type", type(exc).__name__)
    if exc.info.get("traceback", "").strip() == f"{kind}: {exc}":
        return str(exc)
    return f"error while importing {module}: {kind}: {exc}"


def run(args: argparse.Namespace) -> int:
    problem = output_file_problem("--json", args.json, "to write the results into") if args.json and not args.list else None
    if problem:  # before the checks, which take minutes, and whose report it would lose
        print(f"lora-lab verify: {problem}", file=sys.stderr)
        return 2
    sandbox.use(args.sandbox)
    installation = sandbox.InstallationWatch()  # compared after the run: nothing of the target may have changed it
    prepare_for_targets()  # before torch is imported: this process and the target's take turns
    from lora_lab.conformance.judge.profiles import command_profile

    if args.list:
        for c in all_checks():
            print(f"{c.name:<40} requires {'+'.join(c.requires):<28} {c.description}")
        return 0
    from lora_lab.conformance.isolation.proxy import RemoteTarget
    from lora_lab.conformance.isolation.stack import close_stack, start_stack
    from lora_lab.conformance.judge.profiles import draw_seed

    target = None
    try:
        target = RemoteTarget(args.target, wait=False)  # it imports the target while this process imports the suite
        start_stack(_select(args.only))  # and the oracles' libraries in their own process, for the checks that use them
        target.wait()
    except (ValueError, TargetCrashed, TargetTimedOut) as exc:
        if target is not None:
            target.close()
        close_stack()
        print(f"lora-lab verify: {import_failure(args.target, exc)}", file=sys.stderr)
        return 2
    if not any(target.provides(op) for op in OPERATIONS):
        target.close()
        close_stack()
        print(f"lora-lab verify: {args.target} provides none of the operations ({', '.join(OPERATIONS)}), so nothing "
              "was checked; expected a module (or module:attribute) that defines at least one of them", file=sys.stderr)
        return 2
    print(f"lora-lab verify: sandbox: {sandbox.describe(target.hello['sandbox'])}")
    seed = args.seed if args.seed is not None else draw_seed() if args.profile == "scored" else None
    if seed is not None:
        print(f"lora-lab verify: inputs drawn from seed {seed} (reproduce with --seed {seed})")
    try:
        with command_profile(args.profile, seed):
            results = verify(target, args.only)
        report = json_report(target, args.profile, results, seed) if args.json else None  # may probe the target
        unverified = unsupported_operations(target, results)  # reads its declarations: before its process closes
    finally:
        target.close()
        close_stack()
    tampered = installation.tampered()
    if tampered:  # the targets' processes are gone by now: nothing can change the verdict after this line
        print(f"lora-lab verify: {tampered}; no verdict", file=sys.stderr)
        return 2
    failures = [r for r in results if r.status in (FAILED, ERROR, NOT_ATTEMPTED)]
    for r in failures:
        print(f"\n{r.check.name} {r.status}:\n  property: {r.check.description}\n  detail:   "
              + r.detail.replace("\n", "\n            ") + f"\n  hint:     {r.check.hint}")
    print("\n" + summary(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.json}")
    for line in unverified:
        print(f"lora-lab verify: {line}; a verdict needs at least QLoRA's own case (NF4, blocksize 64, bf16) checked",
              file=sys.stderr)
    return 2 if unverified else 1 if failures else 0
