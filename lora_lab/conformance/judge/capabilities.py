"""What a target supports: declared by the target, or probed by the suite, and recorded either way.

A library need not support every blocksize, dtype or shape the NF4 format allows.
A target may declare what it supports in a module-level ``CAPABILITIES`` dict::

    CAPABILITIES = {"blocksizes": ((64,), "BitsAndBytesConfig has no blocksize option")}

each value a pair (the supported values, the reason the others are not). What it
does not declare, the checks probe (see ``judge/formats.py``). Either way the
checks draw only what is supported, and the report lists the rest as
"not supported: <reason>", so a check still runs on everything the target can do.

Two limits keep a declaration from buying a pass:

- it may narrow what is drawn, never below QLoRA's own case (``QLORA_CASE``: NF4
  with blocksize 64 on bf16 weights, what the paper fine-tunes with). A format
  that declares it away, or is probed not to support it, fails every check that
  draws from it, with that reason, instead of being "not supported" there;
- a target that speaks lora_lab's ``NF4Tensor`` (quantize_nf4, dequantize_nf4 or
  qlora_linear without an ``NF4_FORMAT`` of its own) owes the whole NF4Tensor
  contract: its ``CAPABILITIES`` counts for nothing, so declaring away the
  blocksize it gets wrong cannot turn that failure into "not supported".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lora_lab.conformance.errors import CheckFailed, NotSupported

# QLoRA's own case: every format must support it to pass anything (Dettmers et al. 2023 quantize bf16 weights to NF4
# in blocks of 64). Keyed like CAPABILITIES.
QLORA_CASE = {"blocksizes": 64, "dtypes": torch.bfloat16}
NF4TENSOR_OPERATIONS = ("quantize_nf4", "dequantize_nf4", "qlora_linear")


def speaks_nf4tensor(target) -> bool:
    """Whether the target's layer operations take and return lora_lab's NF4Tensor (no ``NF4_FORMAT`` of its own)."""
    return target.nf4_format() is None and any(target.provides(op) for op in NF4TENSOR_OPERATIONS)


def require_qlora_case(key: str, values: Sequence, reason: str, how: str = "declares") -> None:
    """CheckFailed unless ``values`` (what the target supports for ``key``) hold QLoRA's own case for it."""
    needed = QLORA_CASE.get(key)
    if needed is not None and needed not in values:
        shown = lambda v: str(v).replace("torch.", "")  # noqa: E731
        raise CheckFailed(
            f"the target {how} {key} [{', '.join(shown(v) for v in values)}] ({reason}): QLoRA's own case, NF4 with "
            f"blocksize 64 on bf16 weights, is not among them. A format must support it to pass any check; "
            "CAPABILITIES may narrow what is drawn, never below it")


def declared(target, key: str) -> tuple[tuple, str] | None:
    """The target's own declaration for ``key`` as (supported values, reason), or None when it declares nothing
    or speaks NF4Tensor (whose contract it owes in full). CheckFailed when it declares away QLoRA's own case."""
    capabilities = target.declaration("CAPABILITIES")
    if not isinstance(capabilities, dict) or key not in capabilities or speaks_nf4tensor(target):
        return None
    values, reason = capabilities[key]
    values, reason = tuple(values), str(reason)
    require_qlora_case(key, values, reason)
    return values, reason


def supported(target, key: str, candidates: Sequence, pick=lambda value: value) -> list:
    """The candidates whose ``pick(candidate)`` the target declares supported for ``key`` (all, if it declares nothing).

    Raises NotSupported, with the target's reason, when none is left.
    """
    declaration = declared(target, key)
    if declaration is None:
        return list(candidates)
    values, reason = declaration
    kept = [c for c in candidates if pick(c) in values]
    if not kept:
        raise NotSupported(f"{key} {sorted({pick(c) for c in candidates})}: {reason}")
    return kept
