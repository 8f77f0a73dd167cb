"""Ctrl-C in ``lora-lab train``: the run stops at a step boundary and saves, never halfway through a file.

Once: finish this step, save, exit 130. Twice: stop at once (the step in progress
is dropped), unless the optimizer is mid-update, then just after it. While the run
saves, Ctrl-C only says that it is saving. ``--resume`` continues from the last
finished step.
"""

from __future__ import annotations

import signal
import threading


class InterruptGuard:
    """Ctrl-C once: stop after this step. Twice: stop now, unless the optimizer is mid-update (then after it).

    While the run is saved (``saving``), Ctrl-C only says so: a KeyboardInterrupt there would leave the
    folder without metrics.json or the charts, and the last finished step would be lost after all.
    """

    def __init__(self, say=print) -> None:
        self.requested = self.updating = self.saving = False
        self.say, self.previous = say, None

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _on_sigint(self, signum, frame) -> None:
        if self.saving:
            self.say("\nCtrl-C: still saving the last finished step; this takes a few seconds", flush=True)
            return
        if self.requested and not self.updating:
            raise KeyboardInterrupt
        self.requested = True
        self.say("\nCtrl-C: stopping after this step and saving (press again to stop at once)", flush=True)


def stop_everywhere(guard: InterruptGuard, ctx) -> bool:
    """Whether any rank was asked to stop; every rank must agree, or the others would wait forever."""
    import torch
    import torch.distributed as dist

    if ctx is None or ctx.world_size == 1:
        return guard.requested
    flag = torch.tensor([float(guard.requested)], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
