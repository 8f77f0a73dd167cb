#!/usr/bin/env bash
# The GPU check: the Triton kernels compiled and tested on a real GPU, then the benchmark.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # on a CUDA machine
#   OUT=/some/dir bash benchmarks/gpu_check.sh --dry-run  # on any machine: every step that does not need CUDA
#
# For a CUDA machine without network access, in one run of at most 9 minutes (inside one 10-minute call):
#   1. installs nothing but the wheels carried in .whl/ (if any), into a temporary folder;
#   2. makes lora_lab and lora_lab.kernels importable without installing lora_lab and WITHOUT the repository root on
#      sys.path: there `import kernels` would find our kernels/ folder, not Hugging Face's `kernels` package, which
#      transformers 5 imports (and peft through it). A startup hook maps the two names to their folders; Python runs
#      from a folder outside the repository with PYTHONSAFEPATH=1, and the environment step checks the result;
#   3. checks the machine: the GPU's model, clocks and memory (environment.json), a C compiler and Python's headers
#      (Triton builds its launchers with them), HF_HUB_OFFLINE=1, and that transformers, peft and bitsandbytes import
#      without trying the network;
#   4. runs, side by side (compiling is CPU-bound; there are cores to spare), each under its own time cap:
#        a. tests/triton_kernels/test_kernels.py on the compiled kernels, one tile config each (LORA_LAB_AUTOTUNE=0), in
#           the groups of lora_lab.kernels.compile.specializations.GPU_TEST_GROUPS, each sized to compile in its cap
#           (tests/triton_kernels/test_compile_budget.py holds them to it);
#        b. the autotuned path (test_kernels.py -k autotuned: every config benchmarked, then checked);
#        c. the conformance checks qlora.* on lora_lab.kernels, inputs moved to the GPU, once per kernel path: as
#           dispatched by M, forced fused and forced dense (LORA_LAB_KERNEL_PATH);
#        d. the compile check with this machine's Triton (bf16 and fp32, r = 16 and 64, sm_90a and sm_80: no spill, no
#           serialized wgmma, no overflow) and the count of the test groups' specializations;
#        e. the kernel tests that cover every path under compute-sanitizer memcheck, where the runtime allows it;
#   5. prints the static performance model with measured times (`lora-lab bench --plan`, alone on the GPU);
#   6. runs `python -m lora_lab.cli bench --gpu --quick --json $OUT/bench.json` alone, with the time left.
# Everything lands in $OUT: a log and a result (steps/<step>.json: passed, failed, timed_out or skipped, written
# "running" when the step starts) per step, junit XML for every pytest step (pytest writes it when its cap interrupts
# it; if it could not, the script writes one that says why), conformance_*.json, compile_check.json,
# specializations.json, environment.json, plan.txt, bench.json, gpu_check.json (all of it) and summary.txt.
# The exit status is 1 if a kernel step failed, timed out or could not run; the plan and the benchmark are reported
# but do not fail the check (another part of the project owns them).
#
# --dry-run runs the same script without CUDA: the environment and import checks, the specialization count, a
# reduced compile check, the pytest steps' collection (their -k expressions must select tests and write XML) and one
# conformance step on the CPU (Triton's interpreter); the steps that need CUDA write "skipped". tests/bench/test_gpu_check.py runs it in CI.
# GPU_CHECK_MAX_STEP_S caps every step (to try the timeout path); GPU_CHECK_SECONDS is the whole run (default 530).

set -u
DRY_RUN=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg' (expected --dry-run or --help)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
OUT=${OUT:-$REPO/gpu_check_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT/steps" || exit 2
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_SECONDS:-530}))  # 9 minutes, less a margin for writing the summary
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
rm -f "$OUT"/steps/*.json
FAILED=0  # becomes 1 when a kernel check fails, times out or cannot run
# Outside $OUT (which is copied back) and outside the repository: the startup hook, carried wheels, Triton's cache.
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
SITE=$SCRATCH/site
WORK=$SCRATCH/work  # Python's working folder: not the repository root, whose kernels/ would shadow Hugging Face's
mkdir -p "$SITE" "$WORK"

note() { echo "$*" | tee -a "$SUMMARY"; }

# Seconds a step may use: its own cap, never past the deadline, and never over GPU_CHECK_MAX_STEP_S.
budget() {
    local cap=$1 left=$((DEADLINE - $(date +%s)))
    ((left < cap)) && cap=$left
    [[ -n ${GPU_CHECK_MAX_STEP_S:-} ]] && ((GPU_CHECK_MAX_STEP_S < cap)) && cap=$GPU_CHECK_MAX_STEP_S
    ((cap < 1)) && cap=1  # timeout 0 would mean no limit at all
    echo "$cap"
}

# steps/<name>.json: name, status, exit status, seconds, cap, why. Written at the start ("running") and at the end.
write_result() {  # name status exit seconds cap why
    printf '{"step": "%s", "status": "%s", "exit": %s, "seconds": %s, "cap": %s, "log": "%s.log", "why": "%s"}\n' \
        "$1" "$2" "$3" "$4" "$5" "$1" "${6//\"/\'}" > "$OUT/steps/$1.json"
}

# junit XML for a pytest step that ended without writing one (killed after its cap, or it never started).
write_missing_junit() {  # xml name why
    [[ -s $1 ]] && return
    printf '<?xml version="1.0" encoding="utf-8"?>\n<testsuites><testsuite name="%s" tests="1" errors="1" failures="0" skipped="0">
<testcase classname="gpu_check" name="%s"><error message="%s">pytest wrote no junit XML: %s (see %s.log)</error></testcase>
</testsuite></testsuites>\n' "$2" "$2" "$3" "$3" "$2" > "$1"
}

note "gpu_check started $(date -u +%FT%TZ) in $REPO$( ((DRY_RUN)) && echo ' (dry run: the steps that need CUDA are skipped)')"

# --- 1. wheels carried in .whl/, and nothing else --------------------------------------------------------------
shopt -s nullglob
WHEELS=("$REPO"/.whl/*.whl)
if ((${#WHEELS[@]})); then
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${WHEELS[@]}" > "$OUT/pip.log" 2>&1 \
        && note "installed ${#WHEELS[@]} carried wheel(s) into $SITE" \
        || note "installing the carried wheels failed (see pip.log); going on with what the machine has"
else
    note "no .whl/ folder: using the packages the machine has"
fi

# --- 2. lora_lab and lora_lab.kernels, without the repository root on sys.path ----------------------------------
# pyproject.toml maps the package lora_lab.kernels to the folder kernels/; this hook, run at every interpreter start
# (sitecustomize), maps it and lora_lab to their folders, and nothing else: a top-level `import kernels` goes on to
# find Hugging Face's package (or nothing). With GPU_CHECK_SIGTERM_INTERRUPTS=1 (the pytest steps), the SIGTERM that
# `timeout` sends at a step's cap raises KeyboardInterrupt, so pytest ends the session and writes its junit XML.
cat > "$SITE/sitecustomize.py" <<EOF
import importlib.util, os, signal, sys

_FOLDERS = {"lora_lab": "$REPO/lora_lab", "lora_lab.kernels": "$REPO/kernels"}


class _LoraLabFinder:
    """Finds lora_lab in lora_lab/ and lora_lab.kernels in kernels/, as an installed lora_lab would."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        folder = _FOLDERS.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
        )


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"gpu_check: the step's time cap was reached (signal {signum})")


sys.meta_path.insert(0, _LoraLabFinder)
if os.environ.get("GPU_CHECK_SIGTERM_INTERRUPTS") == "1":
    signal.signal(signal.SIGTERM, _interrupt)
EOF
# A target for the conformance suite: it builds its inputs on the CPU; this moves them to the GPU and back (in the dry
# run, GPU_CHECK_TARGET_DEVICE=cpu leaves them there, for Triton's interpreter).
cat > "$SITE/lora_lab_cuda_target.py" <<'EOF'
"""lora_lab.kernels on the GPU for the conformance suite's CPU-built inputs (.to() and .cpu() are differentiable)."""
import os

from lora_lab import kernels

DEVICE = os.environ.get("GPU_CHECK_TARGET_DEVICE", "cuda")


def _moved(t):
    return None if t is None else t.to(DEVICE)


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    return kernels.fused_qlora_linear(_moved(x), weight.to(DEVICE), _moved(lora_A), _moved(lora_B), scaling,
                                      _moved(bias)).cpu()


def dequantize_nf4(q):
    return kernels.nf4_dequantize(q.to(DEVICE)).cpu()
EOF
cat > "$SITE/gpu_conformance.py" <<'EOF'
"""The suite's qlora checks (or those named after the output file) on the compiled kernels.

dequantize's check needs bitsandbytes; test_kernels covers it.
"""
import json
import sys

from hypothesis import settings

import lora_lab.conformance.judge.profiles  # noqa: F401
from lora_lab.conformance.isolation.target import Target
from lora_lab.conformance.runner import PASSED, all_checks, run_check

settings.load_profile("ci")
target = Target.load("lora_lab_cuda_target")
names = tuple(sys.argv[2:]) or ("qlora.forward_matches_float64", "qlora.gradients_match_float64", "qlora.rejects_bad_input")
results = [run_check(c, target) for c in all_checks() if c.name in names]
for r in results:
    print(f"{r.status:>8}  {r.check.name}" + (f"\n{r.detail}" if r.detail else ""))
with open(sys.argv[1], "w") as f:
    json.dump([{"check": r.check.name, "status": r.status, "detail": r.detail} for r in results], f, indent=2)
sys.exit(0 if len(results) == len(names) and all(r.status == PASSED for r in results) else 1)
EOF
# The machine, the imports and the tools, as JSON; exit 1 names what makes the kernel checks impossible here.
cat > "$SITE/gpu_environment.py" <<'EOF'
"""What this machine is and whether the check can run here: environment.json, and exit 1 with the reasons if not."""
import importlib, json, os, shutil, socket, subprocess, sys, sysconfig, tempfile

out, repo, dry_run = sys.argv[1], os.path.realpath(sys.argv[2]), sys.argv[3] == "1"
env, fatal, warnings = {"python": sys.version.split()[0], "dry_run": dry_run}, [], []


def is_our_folder(path):
    return path is not None and os.path.realpath(path) == os.path.join(repo, "kernels", "__init__.py")


def tried_network(*args, **kwargs):
    raise OSError("gpu_check: an import tried to open a network connection (the GPU machine has none)")


env["sys_path_has_repo_root"] = any(os.path.realpath(p or os.getcwd()) == repo for p in sys.path)
if env["sys_path_has_repo_root"]:
    fatal.append("the repository root is on sys.path: `import kernels` would find lora_lab's folder")
env["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE")
if env["HF_HUB_OFFLINE"] != "1":
    fatal.append("HF_HUB_OFFLINE is not 1: Hugging Face libraries would try the network and wait on it")
compiler = os.environ.get("CC") or next((shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
env["c_compiler"], env["python_h"] = compiler, os.path.exists(headers)
if compiler is None:
    fatal.append("no C compiler (cc, gcc or clang; or $CC): Triton builds each kernel's launcher with one")
else:
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "probe.c")
        with open(source, "w") as f:
            f.write("int main(void) { return 0; }\n")
        try:
            built = subprocess.run([compiler, source, "-o", os.path.join(folder, "probe")], capture_output=True,
                                   text=True, timeout=60)
            problem = built.stderr.strip()[-300:] if built.returncode else ""
        except (OSError, subprocess.TimeoutExpired) as error:
            problem = f"{type(error).__name__}: {error}"
        if problem:
            fatal.append(f"the C compiler {compiler} cannot build a program: {problem}")
if not env["python_h"]:
    fatal.append(f"no {headers}: Triton's launchers include Python.h (install the Python development headers)")

socket.socket.connect = socket.socket.connect_ex = tried_network  # the real machine has no network: fail fast, loudly
import torch, triton  # noqa: E402
import lora_lab, lora_lab.kernels as ours  # noqa: E402

env["torch"], env["triton"] = torch.__version__, triton.__version__
env["lora_lab"], env["lora_lab.kernels"] = lora_lab.__file__, ours.__file__
if os.path.realpath(ours.__file__) != os.path.join(repo, "kernels", "__init__.py"):
    fatal.append(f"lora_lab.kernels comes from {ours.__file__}, not this checkout's kernels/")
for name in ("kernels", "transformers", "peft", "bitsandbytes"):
    try:
        module = importlib.import_module(name)
        env[name] = {"version": getattr(module, "__version__", "?"), "file": module.__file__}
        if name == "kernels" and (is_our_folder(module.__file__) or hasattr(module, "qlora_linear")):
            fatal.append(f"`import kernels` found lora_lab's folder ({module.__file__}), not Hugging Face's package")
    except Exception as error:  # noqa: BLE001 - every failure to import is reported by name
        env[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
        if name == "transformers":
            fatal.append(f"transformers does not import ({env[name]['error']}): the tiny-Llama kernel test fails")
        elif name != "kernels":
            warnings.append(f"{name} does not import ({env[name]['error']}): the benchmark has no bnb+peft comparison")
cuda = torch.cuda.is_available()
env["cuda"] = cuda
if cuda:
    props = torch.cuda.get_device_properties(0)
    env["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
                     "memory_gib": round(props.total_memory / 2**30, 1), "torch_cuda": torch.version.cuda}
    if ours.INTERPRETING:
        fatal.append("lora_lab.kernels is interpreting (TRITON_INTERPRET is set) on a CUDA machine")
elif not dry_run:
    fatal.append("no CUDA device: torch.cuda.is_available() is False")
query = ("name,pci.device_id,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,"
         "clocks.applications.graphics,power.limit,temperature.gpu,mig.mode.current")
try:
    smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True,
                         timeout=30)
    env["nvidia_smi"] = [dict(zip(query.split(","), (v.strip() for v in line.split(","))))
                         for line in smi.stdout.splitlines() if line.strip()] or smi.stderr.strip()[-300:]
except (OSError, subprocess.TimeoutExpired) as error:
    env["nvidia_smi"] = f"{type(error).__name__}: {error}"
env["fatal"], env["warnings"] = fatal, warnings
with open(out, "w") as f:
    json.dump(env, f, indent=1)
for line in fatal:
    print("FATAL:", line)
for line in warnings:
    print("WARNING:", line)
print(json.dumps({k: env[k] for k in ("python", "torch", "triton", "cuda", "c_compiler") if k in env}))
print("device:", json.dumps(env.get("device", "none")), "nvidia-smi:", json.dumps(env["nvidia_smi"]))
sys.exit(1 if fatal else 0)
EOF
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONSAFEPATH=1 PYTHONDONTWRITEBYTECODE=1 HYPOTHESIS_PROFILE=ci
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$SCRATCH/triton_cache}
unset TRITON_INTERPRET LORA_LAB_KERNEL_PATH LORA_LAB_COMPILE_ONLY
cd "$WORK" || exit 2

# --- 3. the machine ------------------------------------------------------------------------------------------------
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || note "nvidia-smi failed (see nvidia-smi.txt)"
CAN_RUN=1  # 0 when the environment makes the kernel steps impossible: they are then written as skipped
step_begin=$(date +%s)
write_result environment running null null 120 ""
if timeout -k 10 120 "$PY" "$SITE/gpu_environment.py" "$OUT/environment.json" "$REPO" "$DRY_RUN" > "$OUT/environment.log" 2>&1; then
    write_result environment passed 0 $(($(date +%s) - step_begin)) 120 ""
    note "passed  environment:"
else
    status=$?
    write_result environment failed "$status" $(($(date +%s) - step_begin)) 120 "see environment.log"
    note "FAILED  environment (exit $status): the kernel steps cannot run here:"
    CAN_RUN=0
    FAILED=1
fi
sed 's/^/    /' "$OUT/environment.log" | tee -a "$SUMMARY"
HAVE_PYTEST=1
"$PY" -c "import pytest, hypothesis" 2> /dev/null || {
    HAVE_PYTEST=0
    FAILED=1
    note "FAILED: pytest or hypothesis is missing (carry their wheels in .whl/): the kernel tests cannot run"
}

# --- 4. the kernel checks, side by side ---------------------------------------------------------------------------
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml")
declare -A STEP_PID STEP_XML STEP_CAP
STEPS=()
start_step() {  # name, cap in seconds, junit XML path or "", command...: runs in the background, writes its result
    local name=$1 cap xml=$3
    cap=$(budget "$2")
    shift 3
    STEPS+=("$name")
    STEP_XML[$name]=$xml
    STEP_CAP[$name]=$cap
    write_result "$name" running null null "$cap" ""
    (
        begin=$(date +%s)
        timeout -k 20 "$cap" "$@" > "$OUT/$name.log" 2>&1
        status=$?
        took=$(($(date +%s) - begin))
        case $status in
            0) write_result "$name" passed 0 "$took" "$cap" "" ;;
            124 | 137) write_result "$name" timed_out "$status" "$took" "$cap" "stopped at its cap of ${cap}s" ;;
            *) write_result "$name" failed "$status" "$took" "$cap" "exit $status" ;;
        esac
        [[ -n $xml ]] && write_missing_junit "$xml" "$name" "the step ended with exit $status after ${took}s (cap ${cap}s)"
        exit $status
    ) &
    STEP_PID[$name]=$!
}
skip_step() {  # name why [junit XML]: a step that cannot run here still leaves its result
    STEPS+=("$1")
    write_result "$1" skipped null 0 0 "$2"
    [[ -n ${3:-} ]] && write_missing_junit "$3" "$1" "skipped: $2"
    note "skipped $1: $2"
}
finish_step() {  # name [pattern the log must not contain]
    local name=$1 forbidden=${2:-} status why took
    wait "${STEP_PID[$name]}"
    status=$?
    took=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['seconds'])" "$OUT/steps/$name.json" 2> /dev/null || echo "?")
    if ((status == 0)) && [[ -n $forbidden ]] && grep -q "$forbidden" "$OUT/$name.log"; then
        status=1
        write_result "$name" failed 1 "$took" "${STEP_CAP[$name]}" "its log says '$forbidden'"
    fi
    if ((status == 0)); then
        note "passed  $name (${took}s)"
    else
        if ((status == 124 || status == 137)); then why="timed out at its cap of ${STEP_CAP[$name]}s"; else why="exit $status"; fi
        [[ -n $forbidden ]] && grep -q "$forbidden" "$OUT/$name.log" && why="$why, its log says '$forbidden'"
        note "FAILED  $name: $why after ${took}s; the end of $name.log:"
        tail -n 25 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
        FAILED=1
    fi
}

TESTS=$REPO/tests/triton_kernels/test_kernels.py
GROUPS_FILE=$OUT/test_groups.tsv
"$PY" -m lora_lab.kernels.compile.specializations --groups > "$GROUPS_FILE" 2> "$OUT/test_groups.log" || {
    note "FAILED: the test groups could not be read (see test_groups.log)"
    FAILED=1
}
NEEDS_CUDA="needs CUDA (dry run)"
((CAN_RUN)) || NEEDS_CUDA="the environment step failed"
COLLECT=()
((DRY_RUN)) && COLLECT=(--collect-only)  # the dry run checks that each group selects tests and writes its XML
if ((HAVE_PYTEST)) && ((CAN_RUN || DRY_RUN)); then
    while IFS=$'\t' read -r group expression; do
        [[ -z $group ]] && continue
        start_step "$group" 220 "$OUT/$group.xml" env LORA_LAB_AUTOTUNE=0 GPU_CHECK_SIGTERM_INTERRUPTS=1 "${PYTEST[@]}" \
            "${COLLECT[@]}" "$TESTS" -k "$expression" --junitxml="$OUT/$group.xml"
    done < "$GROUPS_FILE"
else
    while IFS=$'\t' read -r group _; do
        [[ -n $group ]] && skip_step "$group" "pytest or the environment is missing" "$OUT/$group.xml"
    done < "$GROUPS_FILE"
    FAILED=1
fi
if ((HAVE_PYTEST && CAN_RUN && !DRY_RUN)); then
    start_step test_kernels_autotuned 220 "$OUT/test_kernels_autotuned.xml" env GPU_CHECK_SIGTERM_INTERRUPTS=1 \
        "${PYTEST[@]}" "$TESTS" -k autotuned --junitxml="$OUT/test_kernels_autotuned.xml"
    for path in auto fused dense; do
        start_step "conformance_$path" 220 "" env LORA_LAB_AUTOTUNE=0 LORA_LAB_KERNEL_PATH=$path "$PY" \
            "$SITE/gpu_conformance.py" "$OUT/conformance_$path.json"
    done
    start_step compile_check 220 "" "$PY" -m lora_lab.kernels.compile.compile_check --subset ci --dtype bfloat16 \
        --dtype float32 --no-sass --jobs 4 --json "$OUT/compile_check.json"
else
    skip_step test_kernels_autotuned "$NEEDS_CUDA" "$OUT/test_kernels_autotuned.xml"
    # The dry run runs one conformance step on the CPU, under Triton's interpreter: its target and its plumbing (the
    # gradients' check, slow there, is left out).
    if ((DRY_RUN)); then
        start_step conformance_auto 120 "" env GPU_CHECK_TARGET_DEVICE=cpu "$PY" "$SITE/gpu_conformance.py" \
            "$OUT/conformance_auto.json" qlora.forward_matches_float64 qlora.rejects_bad_input
    else
        skip_step conformance_auto "$NEEDS_CUDA"
    fi
    for path in fused dense; do
        skip_step "conformance_$path" "$NEEDS_CUDA"
    done
    # Compiling needs no GPU: the dry run compiles one kernel of the subset, to run the check end to end.
    start_step compile_check 120 "" "$PY" -m lora_lab.kernels.compile.compile_check --subset ci --arch sm_90a \
        --kernel nf4_dequantize_kernel --no-sass --json "$OUT/compile_check.json"
fi
# The dry run counts one group (tests/triton_kernels/test_compile_budget.py counts them all).
ONE_GROUP=()
((DRY_RUN)) && ONE_GROUP=(--group "$(head -n 1 "$GROUPS_FILE" | cut -f 1)")
start_step specializations 120 "" "$PY" -m lora_lab.kernels.compile.specializations "${ONE_GROUP[@]}" \
    --json "$OUT/specializations.json"

# compute-sanitizer: in the CUDA toolkit, and refused by some runtimes (gVisor: "Device not supported"); probe it first.
if ((DRY_RUN || !CAN_RUN || !HAVE_PYTEST)); then
    skip_step memcheck "$NEEDS_CUDA" "$OUT/memcheck.xml"
else
    SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2> /dev/null | head -n 1)
    if [[ -z $SANITIZER ]]; then
        skip_step memcheck "no compute-sanitizer on this machine" "$OUT/memcheck.xml"
    elif ! timeout 90 "$SANITIZER" --tool memcheck --error-exitcode 99 "$PY" -c "import torch; torch.ones(8, device='cuda').sum().item()" \
        > "$OUT/memcheck_probe.log" 2>&1; then
        skip_step memcheck "compute-sanitizer cannot run here (this runtime refuses it; see memcheck_probe.log)" "$OUT/memcheck.xml"
        tail -n 5 "$OUT/memcheck_probe.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    else
        start_step memcheck 200 "$OUT/memcheck.xml" env LORA_LAB_AUTOTUNE=0 "$SANITIZER" --tool memcheck --error-exitcode 99 \
            --print-limit 20 "${PYTEST[@]}" "$TESTS" -x --junitxml="$OUT/memcheck.xml" \
            -k "decode_exactly or other_tile_shapes or every_kernel_path or splits_k or empty_batch or dequantize_is_bit_exact"
    fi
fi

for step in "${STEPS[@]}"; do
    [[ -n ${STEP_PID[$step]:-} ]] || continue
    case $step in
        test_kernels_autotuned) finish_step "$step" "skipped" ;;  # on a GPU the autotuned tests must run, not skip
        memcheck) finish_step "$step" "ERROR SUMMARY: [1-9]" ;;
        *) finish_step "$step" ;;
    esac
done

# --- 5. the static performance model, with measured times, alone on the GPU --------------------------------------
if ((DRY_RUN || !CAN_RUN)); then
    skip_step plan "$NEEDS_CUDA"
    skip_step bench "$NEEDS_CUDA"
else
    cap=$(budget 120)
    plan_start=$(date +%s)
    write_result plan running null null "$cap" ""
    if timeout -k 10 "$cap" "$PY" -m lora_lab.cli bench --plan > "$OUT/plan.txt" 2>&1; then
        write_result plan passed 0 $(($(date +%s) - plan_start)) "$cap" ""
        note "passed  plan ($(($(date +%s) - plan_start))s): the model with measured times (plan.txt):"
        tee -a "$SUMMARY" < "$OUT/plan.txt"
    else
        status=$?
        write_result plan failed "$status" $(($(date +%s) - plan_start)) "$cap" "exit $status (124: out of time)"
        note "plan failed or ran out of time after $(($(date +%s) - plan_start))s; the end of plan.txt:"
        tail -n 25 "$OUT/plan.txt" | sed 's/^/    /' | tee -a "$SUMMARY"
    fi

    # --- 6. the benchmark, alone on the GPU, with the time left -------------------------------------------------------
    cap=$(budget 240)
    if ((cap < 60)); then
        skip_step bench "only ${cap}s left"
    else
        bench_start=$(date +%s)
        write_result bench running null null "$cap" ""
        timeout -k 10 "$cap" "$PY" -m lora_lab.cli bench --gpu --quick --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
        status=$?
        took=$(($(date +%s) - bench_start))
        if ((status == 0)); then
            write_result bench passed 0 "$took" "$cap" ""
            note "passed  bench (${took}s): $OUT/bench.json"
        else
            write_result bench failed "$status" "$took" "$cap" "exit $status (124: out of time)"
            note "bench exited $status after ${took}s (124: out of time); the end of bench.log:"
            tail -n 25 "$OUT/bench.log" | sed 's/^/    /' | tee -a "$SUMMARY"
        fi
    fi
fi

# --- the whole run as one JSON: the machine (again at the end: its clocks under load), every step's result -------
RESULT=$( ((FAILED)) && echo 'KERNEL CHECKS FAILED' || echo 'kernel checks passed')
"$PY" - "$OUT" "$RESULT" $(($(date +%s) - START)) "$DRY_RUN" <<'EOF' > "$OUT/gpu_check_json.log" 2>&1 || note "gpu_check.json could not be written (see gpu_check_json.log)"
import glob, json, os, subprocess, sys

out, result, seconds, dry_run = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
environment = json.load(open(os.path.join(out, "environment.json"))) if os.path.exists(os.path.join(out, "environment.json")) else None
try:
    clocks = subprocess.run(["nvidia-smi", "--query-gpu=name,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw",
                             "--format=csv"], capture_output=True, text=True, timeout=30).stdout.strip()
except (OSError, subprocess.TimeoutExpired) as error:
    clocks = f"{type(error).__name__}: {error}"
steps = [json.load(open(path)) for path in sorted(glob.glob(os.path.join(out, "steps", "*.json")))]
json.dump({"result": result, "dry_run": dry_run, "seconds": seconds, "environment": environment,
           "clocks_at_end": clocks, "steps": steps}, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
EOF
rm -rf "$SCRATCH"
note "gpu_check finished in $(($(date +%s) - START))s: $RESULT$( ((DRY_RUN)) && echo ' (dry run)')"
exit "$FAILED"
