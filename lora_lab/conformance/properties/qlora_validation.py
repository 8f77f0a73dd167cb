"""The QLoRA linear op refuses what it cannot compute (exercise 03): shapes, dtypes, and a K the op cannot tile.

Every case is tried and listed; a clear exception of any type passes (ValueError/TypeError is the convention),
a result for a malformed call fails, and a K that is not a multiple of the blocksize must be refused or
computed right, never answered with garbage.
"""

from __future__ import annotations

import torch

from lora_lab.conformance.errors import CheckFailed
from lora_lab.conformance.judge.compare import assert_rejects, describe_mismatch, product_bound, seeded_generator
from lora_lab.conformance.judge.formats import has_own_format, quantizer_for
from lora_lab.conformance.properties.qlora import Problem, float64_reference, magnitudes
from lora_lab.conformance.registry import check
from lora_lab.nf4 import quantize_nf4


@check(
    "qlora.rejects_bad_input",
    requires=("qlora_linear",),
    points=3,
    exercise="03",
    hint="Check shapes before computing: x's last dimension must be K, A must be (r, K), B must be (N, r), "
    "bias (N,); raise ValueError (or TypeError for non-tensors / integer x) that names what was expected. "
    "A fused kernel that reads W in tiles inside NF4 blocks needs K to be a multiple of the blocksize: "
    "either compute such a K correctly or refuse it with a ValueError, never return garbage.",
)
def rejects_bad_input(target) -> str:
    """Every mismatch of x, W, A, B and bias shapes, and an integer x, is refused with a clear exception, never a result.

    Also draws K not a multiple of the blocksize (K = 48 and 80 with blocksize 32): the op must either refuse it
    or return the float64 reference's values (the torch reference computes it, the kernels refuse it).
    """
    fn = target.op("qlora_linear")
    g = seeded_generator(0)
    quantizer = quantizer_for(target)
    weight = quantizer.quantize(torch.randn(16, 64, generator=g), 64, quantizer.supports.double_quant[0])
    x, A, B = torch.randn(3, 64, generator=g), torch.randn(4, 64, generator=g), torch.randn(16, 4, generator=g)
    bias = torch.zeros(16)
    cases = {
        "x with the wrong last dimension": (torch.randn(3, 32), weight, A, B, 2.0, None),
        "lora_A with the wrong K": (x, weight, torch.randn(4, 32), B, 2.0, None),
        "lora_B with the wrong rank": (x, weight, A, torch.randn(16, 5), 2.0, None),
        "lora_B with the wrong N": (x, weight, A, torch.randn(8, 4), 2.0, None),
        "bias with the wrong length": (x, weight, A, B, 2.0, torch.zeros(8)),
        "an integer x": (x.to(torch.int64), weight, A, B, 2.0, bias),
    }

    def problem(K: int) -> Problem:
        return Problem(torch.randn(5, K, generator=g), quantize_nf4(torch.randn(7, K, generator=g) * 0.05, 32),
                       torch.randn(2, K, generator=g) / K**0.5, torch.randn(7, 2, generator=g) * 0.1, 2.0, None)

    def wrong(p: Problem, y) -> bool:
        allowed = product_bound(magnitudes(p), p.K, torch.float32)
        return not isinstance(y, torch.Tensor) or describe_mismatch(y, float64_reference(p), allowed, "y") is not None

    listing = assert_rejects(fn, cases, "qlora_linear")
    if has_own_format(target):
        return listing  # the K probe below draws NF4Tensor weights
    control = problem(64)
    try:
        control_wrong = wrong(control, fn(*control.args()))
    except NotImplementedError:
        raise
    except Exception:  # noqa: BLE001 - broken for whole blocks too
        control_wrong = True
    if control_wrong:
        return listing  # wrong for whole blocks too: that is forward_matches_float64's finding, not a missing K check
    for K in (48, 80):  # 1.5 and 2.5 blocks of 32: a tile of 32 straddles two NF4 blocks
        p = problem(K)
        try:
            y = fn(*p.args())
        except NotImplementedError:
            raise
        except Exception as exc:  # noqa: BLE001 - a clear refusal of any type; ValueError is the convention
            if str(exc).strip():
                continue
            raise CheckFailed(f"qlora_linear with K={K}, not a multiple of the blocksize 32, raised a bare "
                              f"{type(exc).__name__}; expected an error naming K and the blocksize, or the right result") from exc
        if wrong(p, y):
            raise CheckFailed(f"qlora_linear with K={K}, not a multiple of the blocksize 32, returned wrong values (right "
                              "for K=64): a kernel whose tiles assume whole NF4 blocks must check K % blocksize == 0")
    return listing
