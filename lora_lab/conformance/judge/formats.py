"""A library's own quantized-weight type, and what it supports: the format protocol of the conformance suite.

lora_lab's ``NF4Tensor`` is the *interchange* type: bitsandbytes' exact bytes. A
library with another storage (torchao's ``NF4Tensor``, bitsandbytes' own
``(packed, QuantState)`` pair) can still be checked for *semantic* conformance, NF4
as defined, by exporting ``NF4_FORMAT``, an object with these members:

======================================  ==========================================================================
``name``                                what the report calls the format, e.g. ``"torchao NF4Tensor"``
``quantize(weight, blocksize, dq)``     the library's quantized weight (what its ``qlora_linear`` receives)
``dequantize(q)``                       a tensor of the original shape and dtype
``codes(q)``                            int tensor (numel,): each element's level index, row-major
``levels(q)``                           the 16 levels as the library stores them
``absmax(q)``                           fp32 (blocks,): each block's scale as a kernel multiplies by it
                                        (double quantization decoded)
``to_nf4(q)`` (optional)                the same weight as a lora_lab ``NF4Tensor``: claims the interchange level
``from_nf4(nf4tensor)`` (optional)      the reverse, so the library's dequantize can be given bitsandbytes' bytes
======================================  ==========================================================================

With ``NF4_FORMAT`` the target's ``quantize_nf4``, ``dequantize_nf4`` and
``qlora_linear`` take and return the library's own type. Without it the target
speaks ``NF4Tensor``, whose contract (any numel, every blocksize 32…4096, every
dtype, both double-quant settings) it must meet in full.

What a format supports is declared in the target's ``CAPABILITIES`` (see
``capabilities.py``) or probed here, once per target, by quantizing a small
weight for each blocksize, dtype, double-quant setting and a numel that is not a
multiple of the blocksize. What fails is recorded with the library's own reason,
and the checks draw only from what is supported, which must hold QLoRA's own
case (blocksize 64, bf16): a format without it fails, it is not "not supported".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_lab.conformance.errors import NotSupported
from lora_lab.conformance.judge.capabilities import declared, require_qlora_case
from lora_lab.nf4 import FLOAT_DTYPES, NF4_CODE, VALID_BLOCKSIZES, NF4Tensor, dequantize_nf4, quantize_nf4

BLOCKSIZES, DTYPES = VALID_BLOCKSIZES, FLOAT_DTYPES  # what the NF4 contract covers (lora_lab.nf4)


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Two 4-bit codes per byte, the high nibble first (bitsandbytes' layout), as int64 (numel,)."""
    flat = packed.reshape(-1).to(torch.int64)
    return torch.stack((flat >> 4, flat & 15), dim=1).reshape(-1)[:numel]


def as_nf4tensor(q) -> NF4Tensor:
    """lora_lab's NF4Tensor with the fields of ``q``, an NF4Tensor-like object (a learner's, say)."""
    if isinstance(q, NF4Tensor):
        return q
    return NF4Tensor(q.packed, q.absmax, q.blocksize, torch.Size(q.shape), q.dtype, bool(q.double_quant),
                     getattr(q, "absmax_code", None), getattr(q, "absmax_scale", None), getattr(q, "absmax_offset", None))


@dataclass
class NF4TensorFormat:
    """The interchange format: a target whose quantize_nf4 returns (and dequantize_nf4 takes) an NF4Tensor."""

    target: Any
    name: str = "NF4Tensor (bitsandbytes layout)"

    def quantize(self, weight: torch.Tensor, blocksize: int, double_quant: bool):
        return self.target.op("quantize_nf4")(weight, blocksize, double_quant)

    def dequantize(self, q) -> torch.Tensor:
        return self.target.op("dequantize_nf4")(q)

    def codes(self, q) -> torch.Tensor:
        return unpack_codes(q.packed, math.prod(q.shape))

    def levels(self, q) -> torch.Tensor:
        return NF4_CODE

    def absmax(self, q) -> torch.Tensor:
        return as_nf4tensor(q).absmax_fp32()

    def to_nf4(self, q) -> NF4Tensor:
        return as_nf4tensor(q)


def weight_format(target):
    """The target's own ``NF4_FORMAT``, or the interchange format when it has none."""
    own = target.nf4_format()
    return own if own is not None else NF4TensorFormat(target)


def has_own_format(target) -> bool:
    return target.nf4_format() is not None


def to_interchange(target, q) -> NF4Tensor:
    """``q`` as an NF4Tensor, or NotSupported when the target's format claims no conversion (no interchange)."""
    fmt = weight_format(target)
    convert = getattr(fmt, "to_nf4", None)
    if convert is None:
        raise NotSupported(f"{fmt.name} has no to_nf4(): its storage is not bitsandbytes' (interchange not claimed)")
    return convert(q)


def interchange_capabilities(target) -> Capabilities:
    """What the interchange checks may draw: everything for an NF4Tensor target; for a target's own format, what
    it supports, and NotSupported at once when it claims no conversion to NF4Tensor (no interchange level)."""
    if has_own_format(target) and getattr(weight_format(target), "to_nf4", None) is None:
        raise NotSupported(f"{weight_format(target).name} has no to_nf4(): its storage is not bitsandbytes' "
                           "(semantic conformance only)")
    return capabilities(target)


def from_interchange(target, q: NF4Tensor):
    """An NF4Tensor in the target's own format, or NotSupported when the format has no ``from_nf4``."""
    fmt = weight_format(target)
    convert = getattr(fmt, "from_nf4", None)
    if convert is None:
        raise NotSupported(f"{fmt.name} has no from_nf4(): it cannot be given bitsandbytes' bytes (interchange not claimed)")
    return convert(q)


@dataclass
class Capabilities:
    """What a target's format supports; ``missing`` maps each unsupported feature to the library's reason."""

    blocksizes: tuple[int, ...] = BLOCKSIZES
    dtypes: tuple[torch.dtype, ...] = DTYPES
    double_quant: tuple[bool, ...] = (False, True)
    ragged: bool = True  # numel % blocksize != 0 (the last block is short)
    backward: bool = True  # qlora_linear is differentiable in x, A, B and bias
    missing: dict[str, str] = field(default_factory=dict)

    def report(self) -> dict:
        """JSON-ready: the supported values, and "not supported: <reason>" for each feature that is not."""
        return {
            "blocksizes": list(self.blocksizes), "dtypes": [str(d).replace("torch.", "") for d in self.dtypes],
            "double_quant": list(self.double_quant), "ragged numel": self.ragged, "backward": self.backward,
            "not supported": {feature: f"not supported: {reason}" for feature, reason in self.missing.items()},
        }


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


def _probe(fmt, feature: str, weight: torch.Tensor, blocksize: int, double_quant: bool, missing: dict) -> bool:
    try:
        fmt.quantize(weight, blocksize, double_quant)
    except Exception as exc:  # noqa: BLE001 - whatever the library raises is its reason
        missing[feature] = _reason(exc)
        return False
    return True


def capabilities(target) -> Capabilities:
    """Declared or probed once per target; a target without its own format must support everything (the contract)."""
    if not has_own_format(target):
        return Capabilities()
    if target.probed is None:  # kept on the target: a learner's next file (grade's retarget) is probed afresh
        target.probed = _declared_or_probed(target, weight_format(target))
    return target.probed


def _declared_or_probed(target, fmt) -> Capabilities:
    missing: dict[str, str] = {}
    g = torch.Generator().manual_seed(0)
    sample = lambda numel, dtype=torch.float32: torch.randn(numel, generator=g).to(dtype)  # noqa: E731

    def values(key: str, candidates, works, label=lambda key, c: f"{key} {c}") -> tuple:
        declaration = declared(target, key)
        if declaration is not None:
            kept, reason = declaration
            for c in candidates:
                if c not in kept:
                    missing[label(key, c)] = reason
            return tuple(c for c in candidates if c in kept)
        return tuple(c for c in candidates if works(c))

    feature = lambda key, c: {"ragged": "ragged numel (numel % blocksize != 0)"}.get(key, key)  # noqa: E731

    double_quant = values("double_quant", (False, True),
                          lambda dq: _probe(fmt, f"double_quant {dq}", sample(256), 64, dq, missing))
    dq = double_quant[0] if double_quant else False
    blocksizes = values("blocksizes", BLOCKSIZES, lambda b: _probe(fmt, f"blocksizes {b}", sample(2 * b), b, dq, missing))
    b = 64 if 64 in blocksizes else (blocksizes or (64,))[0]
    dtype_name = lambda d: str(d).replace("torch.", "")  # noqa: E731
    dtypes = values("dtypes", DTYPES, lambda d: _probe(fmt, f"dtypes {dtype_name(d)}", sample(2 * b, d), b, dq, missing),
                    label=lambda key, d: f"{key} {dtype_name(d)}")
    ragged = values("ragged", (True,), lambda _: _probe(fmt, feature("ragged", True), sample(b + 1), b, dq, missing), feature)
    backward = values("backward", (True,), lambda _: True, feature)  # not probed: the gradient check finds out
    # What was declared is held to QLoRA's own case by declared(); what was probed is held to it here.
    require_qlora_case("blocksizes", blocksizes, missing.get("blocksizes 64", "probed"), how="supports")
    require_qlora_case("dtypes", dtypes, missing.get("dtypes bfloat16", "probed"), how="supports")
    if not double_quant:
        raise NotSupported(f"the format supports no double_quant: {'; '.join(missing.values())}")
    return Capabilities(blocksizes, dtypes, double_quant, bool(ragged), bool(backward), missing)


@dataclass(frozen=True)
class Quantizer:
    """How a drawn problem's weight is stored: lora_lab's NF4Tensor (interchange), or the target's own format."""

    quantize: Callable
    dequantize: Callable  # the oracle's W is float64 of this
    supports: Capabilities


# The interchange type: weights drawn by lora_lab's quantize_nf4, the oracle's W from lora_lab's dequantize_nf4
# (both checked against bitsandbytes), so a target's own dequantize is never its own oracle.
NF4TENSOR_QUANTIZER = Quantizer(quantize_nf4, dequantize_nf4, Capabilities())


def quantizer_for(target) -> Quantizer:
    """The target's own format when it has one: its layer is checked against float64 of its own dequantized weight."""
    if not has_own_format(target):
        return NF4TENSOR_QUANTIZER
    fmt = weight_format(target)
    return Quantizer(fmt.quantize, fmt.dequantize, capabilities(target))
