"""The QLoRA linear op against the real stack (exercise 03): peft's LoRA on a bitsandbytes ``Linear4bit``.

An interchange check: bitsandbytes holds the same NF4 bytes as the target (a target with its own format is
converted by that format), and the output and gradients must agree with peft + bitsandbytes within twice the
derived fp32 bound, since both sides round. The drawn problems are ``properties.qlora``'s. peft and bitsandbytes
run in a process of their own (``isolation.stack``: ``lora_lab.targets.peft_bnb``'s qlora_linear, every number from
their code).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings

from lora_lab.conformance.errors import CheckFailed
from lora_lab.conformance.judge.autograd import backward
from lora_lab.conformance.judge.compare import assert_close, product_bound, seeded_generator
from lora_lab.conformance.judge.formats import has_own_format, quantizer_for, to_interchange
from lora_lab.conformance.judge.profiles import examples
from lora_lab.conformance.properties.qlora import call_qlora, describe_problem, gradient_bounds, magnitudes, problems
from lora_lab.conformance.registry import INTERCHANGE, check


@check(
    "qlora.matches_peft_bitsandbytes",
    requires=("qlora_linear",),
    points=6,
    exercise="03",
    level=INTERCHANGE,
    stack=("lora_lab.targets.peft_bnb",),
    hint="The real stack is peft's LoRA on a bitsandbytes Linear4bit: base output plus lora_B(lora_A(x)) * scaling, "
    "with the weight dequantized exactly as bitsandbytes does.",
)
def matches_peft_bitsandbytes(target) -> None:
    """In fp32, output and the gradients of x, A, B equal peft's LoRA on a bitsandbytes Linear4bit with the same weights."""
    from lora_lab.conformance.isolation.stack import stack

    peft_qlora_linear = stack().op("qlora_linear")

    @settings(max_examples=examples(6))
    @given(problems(dtypes=(torch.float32,), max_k=256, quantizer=quantizer_for(target)))
    def prop(p):
        # bitsandbytes holds the same bytes: the target's own weight converted by its format (NotSupported without one).
        weight = to_interchange(target, p.weight) if has_own_format(target) else p.weight
        x1, A, B = (t.detach().float().clone().requires_grad_() for t in (p.x, p.lora_A, p.lora_B))
        y = call_qlora(target, p.with_tensors(x1, A, B, p.bias))
        x2, A2, B2 = (t.detach().float().clone().requires_grad_() for t in (p.x, p.lora_A, p.lora_B))
        y_peft = peft_qlora_linear(x2, weight, A2, B2, p.scaling, p.bias)
        allowed = 2 * product_bound(magnitudes(p), p.K, torch.float32)
        assert_close(y, y_peft, allowed, f"output vs peft+bitsandbytes ({describe_problem(p)})")
        grad_out = torch.randn(y.shape, generator=seeded_generator(p.K))
        backward([y], [grad_out])
        backward([y_peft], [grad_out])
        bounds = gradient_bounds(p, grad_out)
        for name, got, want in (("x", x1.grad, x2.grad), ("lora_A", A.grad, A2.grad), ("lora_B", B.grad, B2.grad)):
            if got is None:
                raise CheckFailed(f"{name} received no gradient")
            allowed = 2 * bounds[name].reshape(want.shape)  # both sides round: twice one side's bound
            assert_close(got, want, allowed, f"gradient of {name} vs peft+bitsandbytes ({describe_problem(p)})")

    prop()
