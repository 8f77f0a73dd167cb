"""Properties of AdamW (exercise 05).

Oracle: ``torch.optim.AdamW``, step by step, on the same parameter, gradients
and hyperparameters, in fp64, fp32, bf16 and fp16 (half-precision parameters keep
half-precision moments in torch, and bias correction matters there as much).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_lab.conformance.errors import CheckFailed
from lora_lab.conformance.judge.compare import UNIT_ROUNDOFF, assert_close, assert_equal, seeded_generator
from lora_lab.conformance.judge.contract import DETERMINISTIC, keeps_global_state
from lora_lab.conformance.judge.profiles import examples
from lora_lab.conformance.registry import check


@st.composite
def adamw_problems(draw):
    shape = tuple(draw(st.lists(st.integers(1, 17), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from((torch.float32, torch.float64, torch.bfloat16, torch.float16)))
    hparams = dict(
        lr=draw(st.sampled_from((1e-4, 1e-3, 1e-2, 0.1))),
        betas=draw(st.sampled_from(((0.9, 0.999), (0.8, 0.99), (0.5, 0.9)))),
        # 1e-8 rounds to 0 in fp16 (its smallest number is 6e-8): a zero gradient would give 0 / 0 in torch too.
        eps=draw(st.sampled_from((1e-6, 1e-3) if dtype == torch.float16 else (1e-8, 1e-6, 1e-3))),
    )
    weight_decay = draw(st.sampled_from((0.01, 0.1, 0.5)))
    g = seeded_generator(draw(st.integers(0, 2**31 - 1)))
    param = torch.randn(shape, generator=g, dtype=dtype) * draw(st.sampled_from((0.02, 1.0, 30.0)))
    if dtype == torch.float16:
        # fp16 keeps (1 - beta2) g^2 normal only for |g| in about [0.25, 100]: below, the second moment underflows and
        # torch's own fp16 AdamW divides by eps alone. So fp16 gradients are drawn with magnitudes in [0.5, 1.5].
        magnitude = 0.5 + torch.rand((6, *shape), generator=g)
        grads = list((torch.randn((6, *shape), generator=g).sign() * magnitude).to(dtype))
    else:
        grad_scale = draw(st.sampled_from((1e-6, 1e-2, 1.0, 100.0)))
        grads = [torch.randn(shape, generator=g, dtype=dtype) * grad_scale for _ in range(6)]
    for grad in grads[::2]:
        grad.view(-1)[0] = 0.0  # a zero gradient: Adam must not divide by zero
    return param, grads, hparams, weight_decay


def _likely_cause(weight_decay: float) -> str:
    """What a mismatch at this weight decay rules out: with none, the decay cannot be the cause."""
    if weight_decay == 0.0:
        return ("already wrong with weight_decay=0, so not the weight decay: look at the moments, the bias "
                "corrections, and where eps goes (outside the square root)")
    return (f"right with weight_decay=0 and wrong with weight_decay={weight_decay}: the decay is decoupled, "
            "param *= 1 - lr * weight_decay, applied to the parameter, not added to the gradient")


@check(
    "adamw.matches_torch",
    requires=("adamw_step",),
    points=10,
    exercise="05",
    hint="Follow the formulas in order: both moments from the gradient, their bias corrections, then "
    "param -= lr * m_hat / (sqrt(v_hat) + eps), eps outside the square root; weight decay is decoupled, "
    "param *= 1 - lr * weight_decay, never added to the gradient. The detail says whether the run was already wrong "
    "without weight decay. param and both moments change in place, under torch.no_grad() (a model's parameters require "
    "grad); grad belongs to the caller.",
)
def adamw_matches_torch(target) -> None:
    """Six adamw_step calls equal torch.optim.AdamW (param and both moments), with and without weight decay; grad is
    never written, global state never changed, and the same inputs twice give the same bits.

    Draws ``adamw_problems``: 1-3 dimensional shapes up to 17, fp64/fp32/bf16/fp16, lr, betas, eps from 1e-8 to 1e-3,
    gradients from 1e-6 to 100 with exact zeros (fp16: magnitudes 0.5 to 1.5, where torch's own fp16 AdamW is
    sound); weight decay 0 first, so a mismatch there clears the decay.
    """

    @settings(max_examples=examples(20))
    @given(adamw_problems())
    def prop(problem):
        start, grads, hparams, weight_decay = problem
        u = UNIT_ROUNDOFF[start.dtype]
        beta1, beta2 = hparams["betas"]
        for wd in (0.0, weight_decay):
            # A model's parameters require grad (the optimizer's own do): the update must not be recorded by autograd.
            param, ref = start.clone().requires_grad_(), start.clone().requires_grad_()
            exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
            optimizer = torch.optim.AdamW([ref], **hparams, weight_decay=wd, foreach=False)
            allowed_p = torch.zeros_like(param, dtype=torch.float64)
            # exp_avg sums beta1 * m and (1 - beta1) * g, which may cancel: its rounding is judged by the exponential
            # average of |g| (the size of what was summed), not by the result; so is the update that divides it.
            magnitude = torch.zeros_like(param, dtype=torch.float64)
            for step, grad in enumerate(grads, start=1):
                ref.grad = grad.clone()
                optimizer.step()
                state = optimizer.state[ref]
                magnitude = beta1 * magnitude + (1 - beta1) * grad.double().abs()
                grad_before = grad.clone()
                twin = [t.detach().clone() for t in (param, exp_avg, exp_avg_sq)]  # for a second call
                twin[0].requires_grad_()
                where = f"step {step}, shape {tuple(param.shape)}, {param.dtype}, {hparams}, weight_decay={wd}"
                version = grad._version  # counts every in-place write, a restored one too
                try:
                    with keeps_global_state("adamw_step"):
                        target.op("adamw_step")(param, grad, exp_avg, exp_avg_sq, step, **hparams, weight_decay=wd)
                except RuntimeError as exc:
                    if "requires grad" not in str(exc):
                        raise
                    raise CheckFailed(f"adamw_step on a parameter that requires grad ({where}) raised: {exc}; "
                                      "an optimizer's update is not part of the model's graph: run it under "
                                      "torch.no_grad()") from exc
                assert_equal(grad, grad_before, f"grad after adamw_step ({where}); the gradient must not be modified")
                if grad._version != version:
                    raise CheckFailed(f"adamw_step wrote in place to grad ({where}), even if it restored it; "
                                      "the gradient belongs to the caller: work on a copy")
                target.op("adamw_step")(twin[0], grad.clone(), twin[1], twin[2], step, **hparams, weight_decay=wd)
                for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), (param, exp_avg, exp_avg_sq), twin):
                    if not torch.equal(a, b):
                        raise CheckFailed(f"adamw_step is not deterministic: the same inputs twice gave a different {name} "
                                          f"({where}); it promises {DETERMINISTIC['adamw_step']}")
                # Each step may round a few times per element: in the parameter and in the update lr * m_hat / sqrt(v_hat).
                update = (magnitude / (1 - beta1**step)) / (
                    (state["exp_avg_sq"].double() / (1 - beta2**step)).sqrt() + hparams["eps"]
                )
                allowed_p += 8 * u * (ref.detach().double().abs() + hparams["lr"] * update)
                try:
                    assert_close(exp_avg, state["exp_avg"], 8 * u * step * (magnitude + grad_before.double().abs()),
                                 f"exp_avg, in place ({where})")
                    assert_close(exp_avg_sq, state["exp_avg_sq"], 8 * u * step * (state["exp_avg_sq"] + grad_before.square()),
                                 f"exp_avg_sq, in place ({where})")
                    assert_close(param, ref.detach(), allowed_p, f"param, in place ({where})")
                except CheckFailed as failure:
                    raise CheckFailed(f"{failure}; {_likely_cause(wd)}") from None

    prop()


@check(
    "adamw.first_step_moves_by_lr",
    requires=("adamw_step",),
    points=5,
    exercise="05",
    hint="The moments start at zero, so uncorrected they make the first steps far too small. What should the very "
    "first update look like once they are corrected, and what is step on the first call? step counts from 1: "
    "refuse step < 1 with a ValueError before 1 - beta ** step becomes 0.",
)
def adamw_first_step(target) -> None:
    """Step 1 (no weight decay) moves each element by exactly lr * g / (|g| + eps); step 0 or -1 is a ValueError.

    The expectation is computed before the call, from the gradient as given, and the gradient must come back unchanged.
    """
    for bad in (0, -1):
        param = torch.ones(3)
        try:
            target.op("adamw_step")(param, torch.ones(3), torch.zeros(3), torch.zeros(3), bad)
        except ValueError:
            continue
        except NotImplementedError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CheckFailed(f"adamw_step with step={bad} raised {type(exc).__name__} ({exc}); expected a ValueError "
                              "saying that step counts from 1 (1 - beta ** 0 is 0: bias correction divides by it)") from exc
        raise CheckFailed(f"adamw_step with step={bad} returned; expected a ValueError: step counts from 1")

    @settings(max_examples=examples(15))
    @given(adamw_problems())
    def prop(problem):
        start, grads, hparams, _ = problem
        param, grad = start.clone(), grads[1]
        # Read before the call: an expectation computed afterwards from a grad the target zeroed says "do not move".
        expected = start.double() - hparams["lr"] * grad.double() / (grad.double().abs() + hparams["eps"])
        grad_before = grad.clone()
        target.op("adamw_step")(param, grad, torch.zeros_like(param), torch.zeros_like(param), 1, **hparams, weight_decay=0.0)
        assert_equal(grad, grad_before, f"grad after the first adamw_step ({hparams}); the gradient must not be modified")
        u = UNIT_ROUNDOFF[start.dtype]
        assert_close(param, expected, 8 * u * (start.abs() + hparams["lr"]), f"param after the first step ({hparams})")

    prop()
