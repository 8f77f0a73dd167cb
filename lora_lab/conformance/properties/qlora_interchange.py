"""The QLoRA linear op against the real stack (exercise 03): peft's LoRA on a bitsandbytes ``Linear4bit``.

An interchange check: bitsandbytes holds the same NF4 bytes as the target (a target with its own format is
converted by that format), and the output and gradients must agree with peft + bitsandbytes within twice the
derived fp32 bound, since both sides round. The drawn problems are ``properties.qlora``'s.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings

from lora_lab.conformance.compare import assert_close, product_bound, seeded_generator
from lora_lab.conformance.formats import has_own_format, quantizer_for, to_interchange
from lora_lab.conformance.profiles import examples
from lora_lab.conformance.properties.qlora import call_qlora, describe_problem, gradient_bounds, magnitudes, problems
from lora_lab.conformance.registry import INTERCHANGE, CheckFailed, check


@check(
    "qlora.matches_peft_bitsandbytes",
    requires=("qlora_linear",),
    points=6,
    exercise="03",
    level=INTERCHANGE,
    hint="The real stack is peft's LoRA on a bitsandbytes Linear4bit: base output plus lora_B(lora_A(x)) * scaling, "
    "with the weight dequantized exactly as bitsandbytes does.",
)
def matches_peft_bitsandbytes(target) -> None:
    """In fp32, output and the gradients of x, A, B equal peft's LoRA on a bitsandbytes Linear4bit with the same weights."""
    from dataclasses import replace

    from lora_lab.conformance.oracles import peft_bnb_layer

    @settings(max_examples=examples(6))
    @given(problems(dtypes=(torch.float32,), max_k=256, quantizer=quantizer_for(target)))
    def prop(p):
        # bitsandbytes holds the same bytes: the target's own weight converted by its format (NotSupported without one).
        layer, _ = peft_bnb_layer(replace(p, weight=to_interchange(target, p.weight)) if has_own_format(target) else p)
        x1 = p.x.detach().clone().requires_grad_()
        A, B = p.lora_A.detach().float().clone().requires_grad_(), p.lora_B.detach().float().clone().requires_grad_()
        y = call_qlora(target, p.with_tensors(x1, A, B, p.bias))
        x2 = p.x.detach().clone().requires_grad_()
        y_peft = layer(x2)
        allowed = 2 * product_bound(magnitudes(p), p.K, torch.float32)
        assert_close(y, y_peft, allowed, f"output vs peft+bitsandbytes ({describe_problem(p)})")
        grad_out = torch.randn(y.shape, generator=seeded_generator(p.K))
        y.backward(grad_out)
        y_peft.backward(grad_out)
        bounds = gradient_bounds(p, grad_out)
        lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        for name, got, want in (("x", x1.grad, x2.grad), ("lora_A", A.grad, lora_a.grad), ("lora_B", B.grad, lora_b.grad)):
            if got is None:
                raise CheckFailed(f"{name} received no gradient")
            allowed = 2 * bounds[name].reshape(want.shape)  # both sides round: twice one side's bound
            assert_close(got, want, allowed, f"gradient of {name} vs peft+bitsandbytes ({describe_problem(p)})")

    prop()
