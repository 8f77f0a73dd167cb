"""What a target supports: declared by the target, or probed by the suite, and recorded either way.

A library need not support every blocksize, dtype or shape the NF4 format allows.
A target may declare what it supports in a module-level ``CAPABILITIES`` dict::

    CAPABILITIES = {"blocksizes": ((64,), "BitsAndBytesConfig has no blocksize option")}

each value a pair (the supported values, the reason the others are not). What it
does not declare, the checks probe (see ``properties/formats.py``). Either way the
checks draw only what is supported, and the report lists the rest as
"not supported: <reason>", so a check still runs on everything the target can do.
"""

from __future__ import annotations

from collections.abc import Sequence

from lora_lab.conformance.errors import NotSupported


def declared(target, key: str) -> tuple[tuple, str] | None:
    """The target's own declaration for ``key`` as (supported values, reason), or None when it declares nothing."""
    capabilities = target.declaration("CAPABILITIES")
    if not isinstance(capabilities, dict) or key not in capabilities:
        return None
    values, reason = capabilities[key]
    return tuple(values), str(reason)


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
