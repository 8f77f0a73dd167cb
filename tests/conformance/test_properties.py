"""The conformance suite on the reference (lora_lab), the kernels and real third parties.

Every property lives once, in lora_lab/conformance; this file only chooses
targets. Each target is run on the checks for the operations it provides, and
what it provides is pinned below, so an operation cannot silently drop out.
A library's known failures are pinned too: each must still fail (with its
reason in the detail), so a fix upstream, or a suite that stopped seeing the
bug, shows up here.
"""

import contextlib

import pytest
import torch
from hypothesis import Phase, settings
from lora_lab.kernels.common import INTERPRETING

from lora_lab.conformance.isolation.target import Target
from lora_lab.conformance.runner import FAILED, NOT_SUPPORTED, OPERATIONS, PASSED, all_checks, run_check

PROVIDES = {
    "lora_lab": set(OPERATIONS) - {"NF4_FORMAT"},  # lora_lab speaks the interchange type, NF4Tensor
    "lora_lab.kernels": {"dequantize_nf4", "qlora_linear"},
    "lora_lab.targets.peft_bnb": {"quantize_nf4", "dequantize_nf4", "qlora_linear"},
    "lora_lab.targets.bnb_functional": {"quantize_nf4", "dequantize_nf4", "qlora_linear", "NF4_FORMAT"},
    "lora_lab.targets.torchao_nf4": {"quantize_nf4", "dequantize_nf4", "qlora_linear", "NF4_FORMAT"},
    "lora_lab.targets.hf_peft": {"apply_qlora", "training_step"},
}
NEEDS = {"lora_lab.targets.torchao_nf4": "torchao"}  # the compat extra: pip install -e ".[compat]"
# Two of bitsandbytes' CPU bugs live in its vectorized paths, so they show only on CPUs that take them
# (test_findings.py pins both ways): its AVX512 dequantize kernel, and eval mode's AVX512-BF16 repacking.
AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"


def _avx512_bf16() -> bool:
    from lora_lab.targets.libraries import bitsandbytes

    return bool(bitsandbytes().functional.has_avx512bf16())


# Bugs and gaps of the libraries as they are (the compatibility matrix in docs/compat/ has a reproduction of each).
KNOWN_FAILURES = {
    **{(target, "nf4.rejects_bad_input"): "bitsandbytes quantizes an empty weight and NaN/Inf weights without complaint"
       for target in ("lora_lab.targets.peft_bnb", "lora_lab.targets.bnb_functional")},
    ("lora_lab.targets.bnb_functional", "nf4.dequantize_matches_bitsandbytes"):
        "dequantize_4bit returns (1, n) for a 1-D weight and (2, 1) for a (1, 2) one",
    ("lora_lab.targets.bnb_functional", "nf4.format_codes_and_levels"): "the same shape bug of dequantize_4bit",
    ("lora_lab.targets.torchao_nf4", "nf4.rejects_bad_input"): "torchao quantizes an empty weight and NaN/Inf weights",
    ("lora_lab.targets.torchao_nf4", "nf4.round_trip_is_nearest_level"):
        "torchao's levels are 4-decimal roundings of NF4's (off by up to 5e-5), and an all-zero block picks level -1",
    ("lora_lab.targets.torchao_nf4", "nf4.zero_blocks_and_round_trip"): "torchao dequantizes an all-zero block to non-zeros",
    ("lora_lab.targets.torchao_nf4", "nf4.format_codes_and_levels"): "torchao's levels are off NF4's by up to 5e-5",
    ("lora_lab.targets.torchao_nf4", "qlora.rejects_bad_input"): "torchao's linear_nf4 computes an integer x without complaint",
    ("lora_lab.targets.hf_peft", "qlora.apply_rejects_unknown_target"):
        "peft's get_peft_model ignores a target module that matches nothing when another one matches",
    ("lora_lab.targets.peft_bnb", "qlora.rejects_bad_input"):
        "peft on bitsandbytes computes an integer x without complaint; and bitsandbytes 0.50's CPU kernel indexes NF4 "
        "blocks per row when K is not a multiple of the blocksize, so a Linear4bit with K = 48, blocksize 32 computes "
        "with the wrong absmax instead of refusing",
    ("lora_lab.targets.hf_peft", "memory.model_keeps_no_dense_weight"):
        "peft casts a bf16 input up to its fp32 adapters' dtype and autograd keeps that fp32 copy for backward",
}
if AVX512:
    KNOWN_FAILURES["lora_lab.targets.peft_bnb", "nf4.dequantize_matches_bitsandbytes"] = (
        "dequantize_4bit on an AVX512 CPU misreads blocks when a row is not a multiple of a 32 blocksize")
if _avx512_bf16():
    KNOWN_FAILURES["lora_lab.targets.hf_peft", "qlora.apply_dropout_only_in_training"] = (
        "bitsandbytes' Linear4bit in eval mode on an AVX512-BF16 CPU repacks the weight and computes approximately")
# What a library's own format does not claim: bitsandbytes' bytes (torchao stores its own).
NOT_SUPPORTED_HERE = {("lora_lab.targets.torchao_nf4", name) for name in (
    "nf4.bytes_match_bitsandbytes", "nf4.dequantize_matches_bitsandbytes", "nf4.double_quant_offset",
    "nf4.double_quant_scales", "nf4.double_quant_codes", "nf4.double_quant_grid_table", "qlora.matches_peft_bitsandbytes",
    "nf4.quantize_realistic_size", "nf4.dequantize_realistic_size")}
# Checks that draw lora_lab NF4Tensor weights (memory, Triton bounds) do not apply to a library's own format.
NOT_SUPPORTED_HERE |= {(target, name) for target in ("lora_lab.targets.torchao_nf4", "lora_lab.targets.bnb_functional")
                       for name in ("memory.qlora_linear_keeps_no_dense_weight", "bounds.dequantize_nf4", "bounds.qlora_linear")}
# The slowest training checks (about a minute together) run on transformers + peft in the compatibility matrix
# (`lora-lab verify lora_lab.targets.hf_peft --json`), not in every test run.
MATRIX_ONLY = {("lora_lab.targets.hf_peft", name) for name in
               ("training.matches_reference", "training.lowers_loss", "training.matches_peft_bitsandbytes",
                "training.gradient_checkpointing")}
# Triton's interpreter (no GPU) runs a kernel element by element in numpy: the realistic sizes take 17 s (dequantizing
# 17 million elements) and over a minute (4096 x 4096 forward and backward). They run wherever the kernels are compiled.
if INTERPRETING:
    MATRIX_ONLY |= {("lora_lab.kernels", "nf4.dequantize_realistic_size"), ("lora_lab.kernels", "qlora.llama_shapes")}
CASES = [(name, check) for name in PROVIDES for check in all_checks()
         if set(check.requires) <= PROVIDES[name] and (name, check.name) not in MATRIX_ONLY]


@contextlib.contextmanager
def no_shrinking():
    previous = settings.get_current_profile_name()
    settings.register_profile("known-failure", parent=settings.get_profile(previous),
                              phases=[Phase.explicit, Phase.reuse, Phase.generate])
    settings.load_profile("known-failure")
    try:
        yield
    finally:
        settings.load_profile(previous)


def _load(target_name: str) -> Target:
    if target_name in NEEDS:
        pytest.importorskip(NEEDS[target_name])
    return Target.load(target_name)


@pytest.mark.parametrize("target_name", sorted(PROVIDES))
def test_target_provides_what_it_should(target_name):
    target = _load(target_name)
    assert {op for op in OPERATIONS if target.provides(op)} == PROVIDES[target_name]


@pytest.mark.parametrize("target_name, check", CASES, ids=[f"{name}-{check.name}" for name, check in CASES])
def test_target_satisfies_property(target_name, check):
    if (target_name, check.name) in KNOWN_FAILURES:
        with no_shrinking():  # a known failure needs rejecting, not its smallest example: shrinking costs a minute
            result = run_check(check, _load(target_name))
    else:
        result = run_check(check, _load(target_name))
    if (target_name, check.name) in NOT_SUPPORTED_HERE:
        assert result.status == NOT_SUPPORTED, f"{check.name} on {target_name}: {result.status}\n{result.detail}"
        return
    if (target_name, check.name) in KNOWN_FAILURES:
        assert result.status == FAILED, (f"{check.name} on {target_name} was pinned as a known failure "
                                         f"({KNOWN_FAILURES[target_name, check.name]}) but it {result.status}")
        return
    assert result.status == PASSED, f"{check.name} on {target_name}: {result.status}\n{result.detail}"


@pytest.mark.parametrize("target_name", sorted(PROVIDES))
def test_declared_self_comparisons_name_real_checks(target_name):
    """A target's SELF_COMPARISONS must name checks that exist, or a renamed check would lose its caveat silently."""
    declared = getattr(_load(target_name).obj, "SELF_COMPARISONS", {})
    assert set(declared) <= {c.name for c in all_checks()}, sorted(set(declared) - {c.name for c in all_checks()})


def test_the_realistic_size_cases_come_from_the_runs_seed(monkeypatch):
    """A scored run (a forced seed) draws another weight past 2^24 elements and another prefill; ci keeps one."""
    import hypothesis.core

    from lora_lab.conformance.judge.profiles import run_seed
    from lora_lab.conformance.properties.realistic import PAST_2_24, case_beyond_2_24

    monkeypatch.setattr(hypothesis.core, "global_force_seed", None)
    assert settings.default.derandomize and case_beyond_2_24() == case_beyond_2_24()  # ci: the same case every run
    cases = set()
    for seed in (1, 2, 3):
        monkeypatch.setattr(hypothesis.core, "global_force_seed", seed)
        (rows, cols), values = case_beyond_2_24()
        assert rows * cols >= PAST_2_24 and cols % 64 == 0
        cases.add(((rows, cols), values, run_seed("prefill: rows")))
    assert len(cases) == 3
