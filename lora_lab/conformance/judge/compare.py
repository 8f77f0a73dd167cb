"""Comparisons that explain themselves, tolerances derived from the arithmetic, and guarded calls.

Tolerances are never picked to make a test pass. For a sum of ``n`` products
computed in a floating-point type with unit roundoff ``u``, the rounding error
of each element is bounded (with overwhelming probability, since the errors are
independent and average out) by about ``sqrt(n) * u * sum_i |a_i * b_i|``. We
add a few ``u_io`` for rounding the inputs and the output to the storage dtype.
So every bound here is elementwise: ``eps-terms x (|a| @ |b|)``, computed from the
very tensors under test.

A guarded call (``call_guarded``) clones the inputs before the implementation
sees them, and checks afterwards that they were not modified and that the output
is finite, plus the rest of the contract in ``contract.py`` (global state,
layout, outputs owned by the caller, determinism): the holes that benchmark
verifiers learned to close.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lora_lab.conformance.errors import CheckFailed
from lora_lab.conformance.judge import contract

# Unit roundoff of each storage dtype (half the distance from 1.0 to the next number).
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}
# The outliers drawn in each dtype: large activations and weights exist in real models, and bf16's past fp16's
# largest number (65,504) catches a bf16 computation done in fp16, which overflows to Inf.
OUTLIER_MAGNITUDE = {
    torch.float64: 2.0**30,
    torch.float32: 2.0**20,
    torch.float16: 2.0**7,  # 128: gradients through a large scaling must still fit fp16
    torch.bfloat16: 2.0**17,
}
ACCUMULATOR_ROUNDOFF = 2.0**-24  # implementations accumulate in fp32 (or better)
# Rounding events on the way in and out: W to x's dtype, the r-wide intermediate,
# A/B casts, and the output itself. Each costs at most one u of the storage dtype.
IO_ROUNDINGS = 4


def product_bound(magnitude: torch.Tensor, reduction: int, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise error bound for a result whose exact value is a sum of ``reduction`` products.

    ``magnitude`` is ``sum |a_i b_i|`` per element (e.g. ``|x| @ |W|^T``); ``dtype``
    is the storage dtype of the implementation's inputs and output.
    """
    if reduction < 1:
        raise ValueError(f"expected a positive reduction length, got {reduction}")
    u_io = UNIT_ROUNDOFF[dtype]
    u_accumulate = min(u_io, ACCUMULATOR_ROUNDOFF)
    per_magnitude = IO_ROUNDINGS * u_io + math.sqrt(reduction) * u_accumulate
    tiny = torch.finfo(dtype).tiny
    return per_magnitude * magnitude.double() + tiny


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, allowed: torch.Tensor | float, what: str) -> str | None:
    """A verbose-allclose report, or None when every element is within ``allowed``."""
    if tuple(actual.shape) != tuple(expected.shape):
        return f"{what}: expected shape {tuple(expected.shape)}, got {tuple(actual.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    allowed = torch.as_tensor(allowed, dtype=torch.float64).cpu()
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).sum().item()
        first = tuple(int(i) for i in (~torch.isfinite(a)).nonzero()[0]) if a.dim() else ()
        return f"{what}: {bad} of {a.numel()} elements are NaN or Inf (first at index {first})"
    diff = (a - e).abs()
    excess = diff - allowed.expand_as(diff)
    bad = excess > 0
    if not bad.any():
        return None
    worst = int(torch.argmax(excess.reshape(-1)))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
    return (
        f"{what}: {int(bad.sum())} of {a.numel()} elements differ beyond the tolerance; "
        f"worst at index {index}: expected {e.reshape(-1)[worst].item():.7g}, got {a.reshape(-1)[worst].item():.7g} "
        f"(|diff| {diff.reshape(-1)[worst].item():.3g} > allowed {allowed.expand_as(diff).reshape(-1)[worst].item():.3g})"
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, allowed: torch.Tensor | float, what: str) -> None:
    if not isinstance(actual, torch.Tensor):
        raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(actual).__name__}")
    message = describe_mismatch(actual, expected, allowed, what)
    if message:
        raise CheckFailed(message)


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit-exact equality (same dtype, shape and values), with the first mismatch named."""
    if not isinstance(actual, torch.Tensor):
        raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(actual).__name__}")
    if actual.dtype != expected.dtype:
        raise CheckFailed(f"{what}: expected dtype {expected.dtype}, got {actual.dtype}")
    if tuple(actual.shape) != tuple(expected.shape):
        raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(actual.shape)}")
    if torch.equal(actual.cpu(), expected.cpu()):
        return
    a, e = actual.cpu(), expected.cpu()
    same = (a == e) | (torch.isnan(a) & torch.isnan(e)) if a.is_floating_point() else a == e
    if bool(same.all()):
        return
    mismatches = (~same).nonzero()
    index = tuple(int(i) for i in mismatches[0])
    raise CheckFailed(
        f"{what}: {len(mismatches)} of {a.numel()} elements differ; first at index {index}: "
        f"expected {e[index].item()!r}, got {a[index].item()!r}"
    )


def _is_plain(tensor: torch.Tensor) -> bool:
    """A plain tensor, not a subclass such as torchao's NF4Tensor (whose clone() re-quantizes with default settings)."""
    return type(tensor) in (torch.Tensor, torch.nn.Parameter)


def _snapshot(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone() if _is_plain(value) else contract.owned_copy(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v) for v in value)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    return value


def _unchanged(before, after) -> bool:
    if isinstance(before, torch.Tensor) and not _is_plain(before):  # a subclass: the tensors it is made of
        return all(_unchanged(b, a) for b, a in zip(contract.tensors_in(before), contract.tensors_in(after)))
    if isinstance(before, torch.Tensor):
        return torch.equal(before, after.detach()) or (
            before.is_floating_point() and torch.equal(torch.nan_to_num(before), torch.nan_to_num(after.detach()))
        )
    if isinstance(before, (list, tuple)):
        return all(_unchanged(b, a) for b, a in zip(before, after))
    if isinstance(before, dict):
        return all(_unchanged(before[k], after[k]) for k in before)
    return True


def call_guarded(fn: Callable, *args, name: str = "the call", deterministic: bool = False, **kwargs):
    """Call ``fn`` under the contract of ``contract.py`` and return what it returned, as it was at the return.

    Fails if the call wrote to a tensor argument (even one it restored), changed
    global state, returned NaN/Inf, a non-contiguous tensor or one sharing storage
    with an input, or changed an earlier output. The result is an owned copy taken
    at the return (an output that needs autograd is returned live and watched), so
    a value written later by the target cannot make a wrong answer pass. With
    ``deterministic`` the op is called a second time on copies of the same inputs
    and must give the same bits.
    """
    before_args, before_kwargs = _snapshot(args), _snapshot(kwargs)
    versions = contract.input_versions((args, kwargs))
    contract.WATCH.verify(after=f"the next call ({name})")
    with contract.keeps_global_state(name):
        out = fn(*args, **kwargs)
    copied = contract.owned_copy(out)
    for position, (before, after) in enumerate(zip(before_args, args)):
        if not _unchanged(before, after):
            raise CheckFailed(f"{name} modified its input argument #{position}; inputs must be left unchanged")
    for key in before_kwargs:
        if not _unchanged(before_kwargs[key], kwargs[key]):
            raise CheckFailed(f"{name} modified its input {key!r}; inputs must be left unchanged")
    contract.check_inputs_not_written(versions, (args, kwargs), name)
    for t in contract.tensors_in(copied):
        if _is_plain(t) and t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckFailed(f"{name} returned NaN or Inf for finite inputs")
    contract.check_layout(out, name)
    contract.check_no_input_alias(out, (args, kwargs), name)
    contract.WATCH.record(out, copied, f"the output of {name}")
    contract.WATCH.verify(after=name)
    if deterministic:
        contract.check_deterministic(fn, before_args, before_kwargs, copied, name)
    if isinstance(out, torch.Tensor) and out.requires_grad:
        return out
    return copied


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def add_outliers(t: torch.Tensor, count: int, generator: torch.Generator, signed: bool = True) -> torch.Tensor:
    """``t`` with ``count`` elements (at drawn places, of drawn sign unless not ``signed``) set to ``OUTLIER_MAGNITUDE``."""
    flat = t.reshape(-1).clone()
    where = torch.randint(0, flat.numel(), (count,), generator=generator)
    signs = torch.randint(0, 2, (count,), generator=generator).to(flat.dtype) * 2 - 1 if signed else 1
    flat[where] = signs * OUTLIER_MAGNITUDE[t.dtype]
    return flat.reshape(t.shape)


CONVENTIONAL_ERRORS = (ValueError, TypeError)  # lora_lab's convention for bad input; any clear exception is accepted


def _holds_nan(out) -> bool:
    if isinstance(out, torch.Tensor):
        return _is_plain(out) and out.is_floating_point() and bool(torch.isnan(out).any())
    return isinstance(out, float) and math.isnan(out)


def assert_rejects(fn: Callable, cases: dict[str, tuple], name: str) -> str:
    """Try every bad input, and list what each did; fail if any was accepted.

    A clear exception of any type (one with a message) rejects the input: a
    library's own RuntimeError or assert is as good a refusal as a ValueError,
    which is only the convention, and noted as such. A returned result fails,
    a NaN one says so. Returns the list of outcomes, for the report.
    """
    outcomes, accepted = [], 0
    for description, args in cases.items():
        try:
            out = fn(*args)
        except NotImplementedError:
            raise
        except Exception as exc:  # noqa: BLE001 - any exception type may be the library's refusal
            if not str(exc).strip():
                accepted += 1
                outcomes.append(f"{description}: {type(exc).__name__} with no message (say what was expected)")
            elif isinstance(exc, CONVENTIONAL_ERRORS):
                outcomes.append(f"{description}: {type(exc).__name__}")
            else:
                outcomes.append(f"{description}: {type(exc).__name__} (accepted; the convention is ValueError or TypeError)")
            continue
        accepted += 1
        outcomes.append(f"{description}: returned a {'NaN ' if _holds_nan(out) else ''}result instead of raising")
    listing = "; ".join(outcomes)
    if accepted:
        raise CheckFailed(f"{name} accepted {accepted} of {len(cases)} bad inputs: {listing}")
    return f"all {len(cases)} bad inputs refused: {listing}"
