"""A training run long enough to see a step that stops learning (exercise 06), in the spirit of Liger-Kernel's
32-step mini-model convergence tests.

The other training checks take 2 to 10 steps; a ``training_step`` that is right
for ten calls and then stops updating, or that nudges a buffer a little every
step, passes all of them. Here the target and lora_lab's reference train twin
tiny Llamas (same NF4 base, same starting adapters) for 32 AdamW steps over a
cycle of four batches. At every step the losses must agree, within a bound that
grows with the step (rounding differences accumulate, linearly at most while
training is stable), and the step must move the adapters. The adapters
themselves are compared after four steps by ``training.matches_reference``: over
32 AdamW steps the update m / sqrt(v) of an element whose gradient is near zero
amplifies a one-ulp difference, so a correct stack that rounds differently
(peft on bitsandbytes) drifts from lora_lab's adapters by far more than
rounding, while its losses agree. Every other tensor of the model (each
parameter, each buffer, persistent or not, the NF4 storage) must be
bit-identical to what it was before the first step, and no step may change
global state (the RNG, the thread count, the default dtype, grad mode).
"""

from __future__ import annotations

import torch

from lora_lab.conformance.errors import CheckFailed
from lora_lab.conformance.judge.compare import assert_equal
from lora_lab.conformance.judge.contract import keeps_global_state
from lora_lab.conformance.properties.training import TRAINING_HINT, _as_loss, _assert_loss, _optimizer, _twins
from lora_lab.conformance.registry import check
from lora_lab.data import collate, generate_products

CONVERGENCE_STEPS, CONVERGENCE_BATCHES, CONVERGENCE_LR = 32, 4, 1e-2
REFERENCE_GAIN = 0.05  # the reference lowers the mean loss of a cycle of batches by about 7% over the 32 steps


@check(
    "training.converges_like_reference",
    requires=("apply_qlora", "training_step"),
    points=4,
    exercise="06",
    hint=TRAINING_HINT + " Every call must do the same four steps, the 30th as the first, and touch nothing but the "
    "adapters and the optimizer's state: no buffer, no frozen weight, no global setting.",
)
def converges_like_reference(target) -> None:
    """32 steps track lora_lab's reference step by step; every buffer and frozen tensor stays bit-identical."""
    from lora_lab.train import training_step as reference_step

    model, reference = _twins(target, 7, 8, 16, CONVERGENCE_LR)
    reference_optimizer = _optimizer(reference, CONVERGENCE_LR)
    batches = [collate(generate_products(2, seed=700 + i)) for i in range(CONVERGENCE_BATCHES)]
    before = model.frozen_state()
    reference_losses = []
    adapters_before = model.adapters()
    for step in range(1, CONVERGENCE_STEPS + 1):
        batch = batches[(step - 1) % CONVERGENCE_BATCHES]
        with keeps_global_state(f"training_step (step {step})"):  # in the target's process too (call_probes.StateWatch)
            got = _as_loss(model.training_step(batch), step)
        expected = reference_step(reference, batch, reference_optimizer)
        reference_losses.append(expected)
        what = f"loss at step {step} of {CONVERGENCE_STEPS} vs lora_lab's reference (lr={CONVERGENCE_LR}, r=8)"
        _assert_loss(got, expected, what, steps=step)
        adapters_now = model.adapters()
        if all(torch.equal(adapters_now[name][w], adapters_before[name][w]) for name in adapters_now
               for w in ("lora_A", "lora_B")):
            raise CheckFailed(f"step {step} of {CONVERGENCE_STEPS} left every adapter unchanged: it stopped learning "
                              f"(AdamW with lr={CONVERGENCE_LR} moves them at every step)")
        adapters_before = adapters_now
    first, last = (sum(losses) / CONVERGENCE_BATCHES for losses in (reference_losses[:4], reference_losses[-4:]))
    if last > (1 - REFERENCE_GAIN) * first:  # a guard on the check itself: a run that learns nothing compares nothing
        raise CheckFailed(f"the reference did not learn (mean loss of the first and last cycle {first:.4f}, {last:.4f})")
    after = model.frozen_state()
    for name, tensor in before.items():
        if name not in after:
            raise CheckFailed(f"{name} disappeared during training")
        assert_equal(after[name], tensor, f"{name} after {CONVERGENCE_STEPS} training steps (only adapters may change)")
