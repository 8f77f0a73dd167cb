#!/usr/bin/env bash
# The GPU check: the Triton kernels compiled on a real GPU, then the benchmark.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # from the repository root, on a CUDA machine
#
# For a CUDA machine without network access, in one run of at most 9 minutes (inside one 10-minute call):
#   1. installs nothing but the wheels carried in .whl/ (if any), into /tmp/site;
#   2. makes lora_lab.kernels importable without installing lora_lab (a startup hook maps it to kernels/);
#   3. runs, side by side (compiling is CPU-bound; there are cores to spare):
#        a. tests/triton_kernels/test_kernels.py on the compiled kernels, one tile config each (LORA_LAB_AUTOTUNE=0);
#        b. the autotuned path (tests/triton_kernels/test_kernels.py -k autotuned: every config benchmarked, then checked);
#        c. the conformance checks qlora.* on lora_lab.kernels, with the inputs moved to the GPU, once per kernel
#           path: as dispatched by M (small M: split-K), and forced fused and forced dense (LORA_LAB_KERNEL_PATH);
#        d. the compile check with this machine's Triton (every kernel for sm_90a and sm_80: no spill, no overflow);
#        e. the kernel tests that cover every path under compute-sanitizer memcheck, where the runtime allows it
#           (a gVisor machine refuses it: that is reported, not failed);
#   4. prints the static performance model with measured times (`lora-lab bench --plan`, alone on the GPU);
#   5. runs `python -m lora_lab.cli bench --gpu --quick --json $OUT/bench.json` alone, with the time left.
# Everything lands in $OUT: one log per step, junit XML for the tests, conformance*.json, compile_check.json,
# plan.txt, bench.json and summary.txt. The exit status is 1 if a kernel step failed; a missing or failing
# benchmark is reported in summary.txt but does not fail the check (another part of the project owns it).

set -u
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu_check_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$((START + 530))  # 9 minutes, less a margin for writing the summary
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
FAILED=0  # becomes 1 when a kernel check fails or cannot run

note() { echo "$*" | tee -a "$SUMMARY"; }

# Seconds a step may use: its own cap, but never past the deadline.
budget() {
    local cap=$1 left=$((DEADLINE - $(date +%s)))
    ((left < cap)) && cap=$left
    ((cap < 1)) && cap=1  # timeout 0 would mean no limit at all
    echo "$cap"
}

note "gpu_check started $(date -u +%FT%TZ) in $REPO"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || note "nvidia-smi failed (see nvidia-smi.txt)"

# --- 1. wheels carried in .whl/, and nothing else --------------------------------------------------------------
SITE=/tmp/site
mkdir -p "$SITE"
shopt -s nullglob
WHEELS=(.whl/*.whl)
if ((${#WHEELS[@]})); then
    timeout 60 "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${WHEELS[@]}" > "$OUT/pip.log" 2>&1 \
        && note "installed ${#WHEELS[@]} carried wheel(s) into $SITE" \
        || note "installing the carried wheels failed (see pip.log); going on with what the machine has"
else
    note "no .whl/ folder: using the packages the machine has"
fi

# --- 2. lora_lab.kernels without installing lora_lab ------------------------------------------------------------
# pyproject.toml maps the package lora_lab.kernels to the folder kernels/. Without `pip install -e .` Python
# would not know that; this hook, run at every interpreter start (sitecustomize), tells it.
cat > "$SITE/sitecustomize.py" <<EOF
import importlib.util, os, sys

_KERNELS = "$REPO/kernels"


class _LoraLabKernelsFinder:
    """Finds lora_lab.kernels in kernels/, as pyproject.toml's package-dir does for an installed lora_lab."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "lora_lab.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, os.path.join(_KERNELS, "__init__.py"), submodule_search_locations=[_KERNELS]
        )


sys.meta_path.insert(0, _LoraLabKernelsFinder)
EOF
# A target for the conformance suite: it builds its inputs on the CPU; this moves them to the GPU and back.
cat > "$SITE/lora_lab_cuda_target.py" <<'EOF'
"""lora_lab.kernels on the GPU for the conformance suite's CPU-built inputs (.cuda() and .cpu() are differentiable)."""
from lora_lab import kernels


def _cuda(t):
    return None if t is None else t.cuda()


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    return kernels.fused_qlora_linear(_cuda(x), weight.to("cuda"), _cuda(lora_A), _cuda(lora_B), scaling, _cuda(bias)).cpu()


def dequantize_nf4(q):
    return kernels.nf4_dequantize(q.to("cuda")).cpu()
EOF
cat > "$SITE/gpu_conformance.py" <<'EOF'
"""The suite's qlora checks on the compiled kernels (dequantize's check needs bitsandbytes; test_kernels covers it)."""
import json
import sys

from hypothesis import settings

import lora_lab.conformance.judge.profiles  # noqa: F401
from lora_lab.conformance.isolation.target import Target
from lora_lab.conformance.runner import PASSED, all_checks, run_check

settings.load_profile("ci")
target = Target.load("lora_lab_cuda_target")
names = ("qlora.forward_matches_float64", "qlora.gradients_match_float64", "qlora.rejects_bad_input")
results = [run_check(c, target) for c in all_checks() if c.name in names]
for r in results:
    print(f"{r.status:>8}  {r.check.name}" + (f"\n{r.detail}" if r.detail else ""))
with open(sys.argv[1], "w") as f:
    json.dump([{"check": r.check.name, "status": r.status, "detail": r.detail} for r in results], f, indent=2)
sys.exit(0 if len(results) == len(names) and all(r.status == PASSED for r in results) else 1)
EOF
export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
export TRITON_CACHE_DIR=/tmp/triton_cache HYPOTHESIS_PROFILE=ci PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET

if ! "$PY" - > "$OUT/environment.txt" 2>&1 <<'EOF'
import sys
import torch, triton
import lora_lab.kernels as k
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("lora_lab.kernels from", k.__file__, "interpreting:", k.INTERPRETING)
sys.exit(0 if torch.cuda.is_available() and not k.INTERPRETING else 1)
EOF
then
    note "FAILED: no CUDA device, or lora_lab.kernels does not import (see environment.txt):"
    tee -a "$SUMMARY" < "$OUT/environment.txt"
    exit 1
fi
tee -a "$SUMMARY" < "$OUT/environment.txt"
HAVE_PYTEST=1
"$PY" -c "import pytest, hypothesis" 2> /dev/null || { HAVE_PYTEST=0; FAILED=1; note "FAILED: pytest or hypothesis is missing (carry their wheels in .whl/): the kernel tests cannot run"; }

# --- 3. the kernel checks, side by side ---------------------------------------------------------------------------
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
declare -A STEP_PID
start_step() {  # name, cap in seconds, command...: runs in the background, records its own duration
    local name=$1 cap
    cap=$(budget "$2")
    shift 2
    (
        begin=$(date +%s)
        timeout -k 10 "$cap" "$@" > "$OUT/$name.log" 2>&1
        status=$?
        echo $(($(date +%s) - begin)) > "$OUT/.$name.seconds"
        exit $status
    ) &
    STEP_PID[$name]=$!
}
finish_step() {  # name [pattern the log must not contain]
    local name=$1 forbidden=${2:-} status why
    wait "${STEP_PID[$name]}"
    status=$?
    local took
    took=$(cat "$OUT/.$name.seconds" 2> /dev/null || echo "?")
    rm -f "$OUT/.$name.seconds"
    if ((status == 0)) && [[ -n $forbidden ]] && grep -q "$forbidden" "$OUT/$name.log"; then
        status=1
    fi
    if ((status == 0)); then
        note "passed  $name (${took}s)"
    else
        if ((status == 124 || status == 137)); then why="timed out"; else why="exit $status"; fi
        [[ -n $forbidden ]] && grep -q "$forbidden" "$OUT/$name.log" && why="$why, its log says '$forbidden'"
        note "FAILED  $name: $why after ${took}s; the end of $name.log:"
        tail -n 25 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
        FAILED=1
    fi
}

if ((HAVE_PYTEST)); then
    start_step test_kernels 220 env LORA_LAB_AUTOTUNE=0 "${PYTEST[@]}" tests/triton_kernels/test_kernels.py -k "not autotuned" \
        --junitxml="$OUT/test_kernels.xml"
    start_step test_kernels_autotuned 220 "${PYTEST[@]}" tests/triton_kernels/test_kernels.py -k autotuned \
        --junitxml="$OUT/test_kernels_autotuned.xml"
fi
for path in auto fused dense; do
    start_step "conformance_$path" 220 env LORA_LAB_AUTOTUNE=0 LORA_LAB_KERNEL_PATH=$path "$PY" "$SITE/gpu_conformance.py" \
        "$OUT/conformance_$path.json"
done
start_step compile_check 200 "$PY" -m lora_lab.kernels.compile.compile_check --subset ci --json "$OUT/compile_check.json"

# compute-sanitizer: in the CUDA toolkit, and refused by some runtimes (gVisor: "Device not supported"); probe it first.
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2> /dev/null | head -n 1)
MEMCHECK=0
if [[ -z $SANITIZER ]]; then
    note "skipped memcheck: no compute-sanitizer on this machine"
elif ! timeout 90 "$SANITIZER" --tool memcheck --error-exitcode 99 "$PY" -c "import torch; torch.ones(8, device='cuda').sum().item()" \
    > "$OUT/memcheck_probe.log" 2>&1; then
    note "skipped memcheck: compute-sanitizer cannot run here (this runtime refuses it); the end of memcheck_probe.log:"
    tail -n 5 "$OUT/memcheck_probe.log" | sed 's/^/    /' | tee -a "$SUMMARY"
elif ((HAVE_PYTEST)); then
    MEMCHECK=1
    start_step memcheck 200 env LORA_LAB_AUTOTUNE=0 "$SANITIZER" --tool memcheck --error-exitcode 99 --print-limit 20 \
        "${PYTEST[@]}" tests/triton_kernels/test_kernels.py -x \
        -k "decode_exactly or other_tile_shapes or every_kernel_path or splits_k or empty_batch or dequantize_is_bit_exact"
fi

if ((HAVE_PYTEST)); then
    finish_step test_kernels
    finish_step test_kernels_autotuned "skipped"  # on a GPU the autotuned tests must run, not skip
fi
for path in auto fused dense; do
    finish_step "conformance_$path"
done
finish_step compile_check
((MEMCHECK)) && finish_step memcheck "ERROR SUMMARY: [1-9]"

# --- 4. the static performance model, with measured times, alone on the GPU --------------------------------------
cap=$(budget 120)
plan_start=$(date +%s)
if timeout -k 10 "$cap" "$PY" -m lora_lab.cli bench --plan > "$OUT/plan.txt" 2>&1; then
    note "passed  plan ($(($(date +%s) - plan_start))s): the model with measured times (plan.txt):"
    tee -a "$SUMMARY" < "$OUT/plan.txt"
else
    note "plan failed or ran out of time after $(($(date +%s) - plan_start))s; the end of plan.txt:"
    tail -n 25 "$OUT/plan.txt" | sed 's/^/    /' | tee -a "$SUMMARY"
fi

# --- 4. the benchmark, alone on the GPU, with the time left -------------------------------------------------------
if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('lora_lab.bench') is None)" 2> /dev/null; then
    cap=$(budget 240)
    if ((cap < 60)); then
        note "skipped bench: only ${cap}s left"
    else
        bench_start=$(date +%s)
        timeout -k 10 "$cap" "$PY" -m lora_lab.cli bench --gpu --quick --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
        status=$?
        took=$(($(date +%s) - bench_start))
        if ((status == 0)); then
            note "passed  bench (${took}s): $OUT/bench.json"
        else
            note "bench exited $status after ${took}s (124: out of time); the end of bench.log:"
            tail -n 25 "$OUT/bench.log" | sed 's/^/    /' | tee -a "$SUMMARY"
        fi
    fi
else
    note "skipped bench: lora_lab/bench/command.py is not in this checkout (python -m lora_lab.cli bench would not exist)"
fi

note "gpu_check finished in $(($(date +%s) - START))s: $( ((FAILED)) && echo 'KERNEL CHECKS FAILED' || echo 'kernel checks passed')"
exit "$FAILED"
