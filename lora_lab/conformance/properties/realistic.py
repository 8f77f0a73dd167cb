"""Properties at the sizes of a real model (exercises 01 and 03): Llama-3.1-8B-sized cases, drawn from the run's seed.

Hypothesis draws small shapes so that a check takes seconds: K up to 512, N up
to 96, weights under 40,000 elements. The mistakes that only show at real sizes
pass every one of them: a block index computed in float32 (exact only below
2^24 elements, and an 8B model's MLP weights hold 58.7 million), a loop over K
that stops early, a tile loop over rows that stops after a few hundred (a
prefill of 2,048 tokens and more is one call), a token id stored in 16 bits
(Llama 3's vocabulary is 128,256). Each check here runs a few cases at the size
a QLoRA fine-tune of Llama 3.1 8B meets, against the same oracles as the drawn
checks: bitsandbytes' bytes, and the float64 formula within the bounds derived
from dtype and K.

The cases are not fixed: their shapes and values come from the run's seed
(``profiles.run_seed``), so ``--profile scored`` draws ones no target has seen,
and a float32 index that is right on one weight is wrong on the next. Each is
one case, not a hypothesis draw: hypothesis' first example is its simplest.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import torch

from lora_lab.conformance.errors import CheckFailed
from lora_lab.conformance.judge.compare import assert_equal, call_guarded, seeded_generator
from lora_lab.conformance.judge.contract import owned_copy
from lora_lab.conformance.judge.formats import from_interchange, has_own_format, interchange_capabilities, to_interchange
from lora_lab.conformance.judge.oracles import bnb_dequantize
from lora_lab.conformance.judge.profiles import run_seed
from lora_lab.conformance.properties.nf4 import check_fields
from lora_lab.conformance.properties.qlora import check_forward, check_gradients, fixed_problem
from lora_lab.conformance.registry import INTERCHANGE, check
from lora_lab.nf4 import NF4Tensor
from lora_lab.targets.libraries import bitsandbytes, bitsandbytes_eager

HIDDEN, KV_WIDTH = 4096, 1024  # Llama 3.1 8B: q_proj/o_proj are 4096 x 4096, k_proj/v_proj 1024 x 4096
# At least 2^18 elements (4,096 blocks of 64) past float32's exact integers, at widths of 3,072 to 5,120 columns.
PAST_2_24 = 2**24 + 2**18
PREFILL_ROWS = (2049, 4096)  # a prefill's tokens in one call: past 2,048 rows, where a row-tile loop that stops early shows


def _drawn(case: str, low: int, high: int) -> int:
    """An integer in [low, high] for ``case``, from the run's seed."""
    return int(torch.randint(low, high + 1, (1,), generator=seeded_generator(run_seed(case))))


def weight_shape_beyond_2_24() -> tuple[int, int]:
    """This run's shape for the weight past 2^24 elements: 3,072 to 5,120 columns, and enough rows to pass PAST_2_24."""
    cols = 64 * _drawn("weight beyond 2^24: columns", 48, 80)
    return -(-PAST_2_24 // cols) + _drawn("weight beyond 2^24: rows", 0, 64), cols


@functools.lru_cache(maxsize=1)
def _weight_beyond_2_24(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """A weight of more than 2^24 elements: Llama's 0.02 scale, one outlier past 2^24. Made once per run; the checks
    hand out copies, so nothing a target does can change what the next one is compared with.

    fp32, because bitsandbytes quantizes fp32 on the CPU ten times faster than bf16; the drawn checks cover bf16.
    """
    g = seeded_generator(seed)
    weight = torch.randn(shape, generator=g).mul_(0.02)
    numel = shape[0] * shape[1]
    weight.view(-1)[int(torch.randint(2**24, numel, (1,), generator=g))] = 3.0
    return weight


@functools.lru_cache(maxsize=1)
def _bnb_beyond_2_24(shape: tuple[int, int], seed: int) -> NF4Tensor:
    """bitsandbytes' NF4 of ``_weight_beyond_2_24(shape, seed)`` (blocksize 64, double quant), made once per run."""
    bnb_functional = bitsandbytes().functional
    with bitsandbytes_eager():
        packed, state = bnb_functional.quantize_4bit(_weight_beyond_2_24(shape, seed), blocksize=64, quant_type="nf4",
                                                     compress_statistics=True)
    return NF4Tensor.from_bnb(packed, state)


def case_beyond_2_24() -> tuple[tuple[int, int], int]:
    """This run's weight past 2^24 elements as (shape, seed of its values), the same for both checks of a run."""
    return weight_shape_beyond_2_24(), run_seed("weight beyond 2^24: values")


@check(
    "nf4.quantize_realistic_size",
    requires=("quantize_nf4",),
    level=INTERCHANGE,
    points=2,
    exercise="01",
    hint="Real weights are large: Llama 3.1 8B's MLP weights hold 58.7 million elements. Past 2^24 (16.8 million) "
    "float32 cannot count every element, so compute element and block indices with integers, never in float32.",
    timed=True,
)
def quantize_realistic_size(target) -> None:
    """A weight past 2^24 + 262,144 elements from the run's seed (blocksize 64, double quant) gives bitsandbytes' bytes."""
    interchange_capabilities(target)  # NotSupported for a format with no conversion to NF4Tensor
    case = case_beyond_2_24()
    weight = _weight_beyond_2_24(*case)
    bitsandbytes()  # imported here, not on the thread
    with ThreadPoolExecutor(1) as pool:  # bitsandbytes' answer is computed while the target computes its own
        expected = pool.submit(_bnb_beyond_2_24, *case)
        q = call_guarded(target.op("quantize_nf4"), weight.clone(), 64, True, name="quantize_nf4")
    expected = expected.result()
    q = to_interchange(target, q) if has_own_format(target) else q
    check_fields(q, weight.numel(), 64, True)
    where = f"weight {tuple(weight.shape)} fp32 ({weight.numel():,} elements, past 2^24), blocksize 64, double_quant"
    assert_equal(q.packed.reshape(-1), expected.packed, f"packed bytes ({where})")
    assert_equal(q.absmax.reshape(-1), expected.absmax, f"uint8 absmax codes ({where})")
    assert_equal(q.absmax_scale.reshape(-1), expected.absmax_scale, f"fp32 scale per 256 blocks ({where})")
    assert_equal(torch.tensor(float(q.absmax_offset)), torch.tensor(expected.absmax_offset), f"absmax offset ({where})")


@check(
    "nf4.dequantize_realistic_size",
    requires=("dequantize_nf4",),
    level=INTERCHANGE,
    points=8,  # as many as the drawn sizes' check: wrong on every large weight of a real model is as wrong
    exercise="01",
    hint="Past 2^24 elements float32 cannot count every element: element i's block is i // blocksize in integers. "
    "A float32 index sends some elements near the end of a large weight to their neighbour's block.",
    timed=True,
)
def dequantize_realistic_size(target) -> None:
    """A double-quantized weight past 2^24 + 262,144 elements from the run's seed dequantizes to bitsandbytes' values."""
    interchange_capabilities(target)
    case = case_beyond_2_24()
    weight, q = _weight_beyond_2_24(*case), _bnb_beyond_2_24(*case)
    given_q = from_interchange(target, owned_copy(q)) if has_own_format(target) else owned_copy(q)
    expected, where = bnb_dequantize(q), f"dequantized weight {tuple(weight.shape)} fp32 ({weight.numel():,} elements)"
    if getattr(target, "uses_triton", False) and not has_own_format(target) and _tail_is_right(target, given_q, expected,
                                                                                                   where):
        return
    got = call_guarded(target.op("dequantize_nf4"), given_q, name="dequantize_nf4")
    assert_equal(got, expected, where)


def _tail_is_right(target, q: NF4Tensor, expected: torch.Tensor, where: str) -> bool:
    """Whether the target, run with only the tail of its Triton interpreter's grids, gives bitsandbytes' values from
    element 2^24 on (or, when its call ran whole, everywhere: then a wrong value fails the check here).

    Triton's interpreter takes 10-20 s for a weight past 2^24 elements, more than one exercise's feedback should; the
    elements a float32 index gets wrong are all past 2^24, and with the exercise's layout (program p writes elements
    p * BLOCK onwards) they are written by the grid's last programs alone (``isolation.probes.TailOfGrid``). Only those
    elements are compared: the others were never written. False, and the caller runs the call whole, when the tail is
    not right or the call failed: a correct kernel with another mapping of programs to elements (a grid-stride loop, a
    2-D grid) is judged on its full run, as is a wrong one before it loses points.
    """
    first = 2**24
    op = target.tail_of_grid("dequantize_nf4", first, expected.numel())

    def tail_of(given):
        out = op(given)
        if not op.last_call.skipped:  # it ran whole (no interpreter, or nothing before the tail): judged whole
            return out
        if not isinstance(out, torch.Tensor) or out.shape != expected.shape or out.dtype != expected.dtype:
            raise CheckFailed("not the weight's shape and dtype")  # said by the full run
        return out.detach().reshape(-1)[first:].clone()  # the rest was not computed: never compared, never checked

    try:
        got = call_guarded(tail_of, q, name="dequantize_nf4")
    except Exception:  # noqa: BLE001 - the full run says what went wrong, if anything did (a crash is no Exception)
        return False
    if not op.last_call.skipped:
        assert_equal(got, expected, where)
        return True
    try:
        assert_equal(got, expected.reshape(-1)[first:], f"elements {first:,} onwards of the {where}")
    except AssertionError:
        return False
    return True


@check(
    "qlora.llama_shapes",
    requires=("qlora_linear",),
    points=2,
    exercise="03",
    hint="At real sizes K is 4096: every loop over K, every tile of N, must run to the end. Decoding is M = 2 rows, "
    "less than one tile; make sure a tile that is mostly empty still writes its rows. A prefill is thousands of rows "
    "in one call: every row tile, the last partial one included, must be computed, forward and backward.",
    timed=True,
)
def llama_shapes(target) -> None:
    """Llama 3.1 8B's q_proj forward, k_proj forward and backward (M = 2) and a prefill of 2,049-4,096 rows, bf16, r = 16.

    q_proj is 4096 x 4096, k_proj 1024 x 4096; the prefill's K and N are narrow. Values and the prefill's shape come
    from the run's seed."""
    q_proj = fixed_problem(2, HIDDEN, HIDDEN, 16, torch.bfloat16, seed=run_seed("q_proj"), target=target)
    check_forward(target, q_proj, "Llama 3.1 8B q_proj")
    # Backward on the smaller one: 4x cheaper.
    k_proj = fixed_problem(2, HIDDEN, KV_WIDTH, 16, torch.bfloat16, seed=run_seed("k_proj"), target=target)
    check_forward(target, k_proj, "Llama 3.1 8B k_proj")
    check_gradients(target, k_proj, "Llama 3.1 8B k_proj")
    # The prefill at a narrow K and N: the rows are what it tests, and the float64 oracle stays under a second.
    rows, K, N = _drawn("prefill: rows", *PREFILL_ROWS), 64 * _drawn("prefill: K", 2, 8), _drawn("prefill: N", 65, 256)
    prefill = fixed_problem(rows, K, N, 16, torch.bfloat16, seed=run_seed("prefill"), target=target)
    check_forward(target, prefill, f"a prefill of {rows:,} rows")
    check_gradients(target, prefill, f"a prefill of {rows:,} rows")
