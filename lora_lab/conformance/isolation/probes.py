"""What the target's process wraps around each call: a neutral thread, and the probes the checks need.

- ``invoke`` calls the target's function on a fresh thread, through a function
  whose code names no file of lora_lab's: the target's call stack holds the
  standard library's thread start-up and one frame, nothing of the suite.
- ``StateWatch`` snapshots global state on that thread (``contract.global_state``:
  some of it, torch's thread count and grad mode, is per thread).
- ``Measured`` (what autograd keeps, ``memory.measure``) and ``Watched`` (every
  memory access of a Triton kernel, ``bounds.watch_memory``) are entered there too,
  since autograd's hooks, dispatch modes and the watch are per thread as well.
- ``guard_inputs`` puts each input inside guard regions, as ``bounds.guarded``
  does in-process.
- ``interpreted_launches`` counts the kernels Triton's interpreter has run: a
  call that ran one is not held to the time budget (``registry.TIME_BUDGET``).
"""

from __future__ import annotations

# The target's functions are called from a fresh thread through a function whose code names no file of lora_lab's:
# the target's call stack holds the standard library's thread start-up and this one frame, nothing of the suite.
# A measurement's context (``memory.measure``) is entered on that thread: autograd's hooks and dispatch modes are per thread.
_NEUTRAL = {}
exec(compile(  # noqa: S102 - a fixed string, compiled only to give the frame a neutral file name
    "def call(fn, args, kwargs, grad_enabled, context, box):\n"
    "    import torch\n"
    "    try:\n"
    "        with torch.set_grad_enabled(grad_enabled), context:\n"
    "            out = fn(*args, **kwargs)\n"
    "            box.append((True, out))\n"
    "    except BaseException as exc:\n"
    "        box.append((False, exc))\n",
    "<call>", "exec"), _NEUTRAL)


def invoke(fn, args, kwargs=None, grad_enabled: bool = True, context=None):
    """``fn(*args, **kwargs)`` on a fresh thread whose stack shows nothing of the suite; its exception is re-raised.
    (How long it took is the suite's to measure, around the request: nothing this process reports is trusted.)"""
    import contextlib
    import threading

    box: list = []
    context = context if context is not None else contextlib.nullcontext()
    thread = threading.Thread(target=_NEUTRAL["call"], args=(fn, tuple(args), dict(kwargs or {}), grad_enabled, context, box),
                              name="target", daemon=True)
    thread.start()
    thread.join()
    if not box:
        raise RuntimeError("the target's call ended without a result or an exception")
    ok, value = box[0]
    if not ok:
        raise value
    return value


class Measured:
    """``memory.measure`` for tensors of ``min_numel`` elements or more, as a context entered on the call's thread."""

    def __init__(self, min_numel: int) -> None:
        from lora_lab.conformance.judge.memory import measure

        self.context = measure(lambda n: n >= min_numel)
        self.record = None

    def __enter__(self):
        self.record = self.context.__enter__()
        return self.record

    def __exit__(self, *exc_info):
        return self.context.__exit__(*exc_info)

    def summary(self) -> list:
        """``[saved, alive]``: what autograd packed for backward, and the op outputs still alive after the call."""
        from lora_lab.conformance.judge.memory import seen_to_wire

        return [seen_to_wire(self.record.saved), seen_to_wire(self.record.alive())]


class Watched:
    """``bounds.watch_memory`` as a context entered on the call's thread (the watch's state is per thread)."""

    def __enter__(self):
        from lora_lab.conformance.judge.bounds import watch_memory

        self.context = watch_memory()
        self.log = self.context.__enter__()
        return self.log

    def __exit__(self, *exc_info):
        return self.context.__exit__(*exc_info)

    def problems(self, tensors: list) -> list[str]:
        """The first stray access the watch stopped, and every input whose guard region was written."""
        from lora_lab.conformance.judge.bounds import guards_changed

        found = [self.log.accesses[0].describe()] if self.log.accesses else []
        for index, tensor in enumerate(tensors):
            side = guards_changed(tensor)
            if side:
                found.append(f"the memory just {side} of input tensor #{index} (shape {tuple(tensor.shape)}) was written")
        return found


def guard_inputs(args, kwargs, tensors: list):
    """Every input tensor (an NF4 weight's fields too) replaced by a copy inside guard regions, layout kept."""
    import dataclasses

    from lora_lab.conformance.judge.bounds import guarded

    def guard(t):
        if t.is_contiguous():
            return guarded(t)
        order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
        return guarded(t.permute(order).contiguous()).permute([order.index(d) for d in range(t.dim())])

    replacement = {id(t): guard(t) for t in tensors}

    def swap(value):
        if id(value) in replacement:
            return replacement[id(value)]
        if isinstance(value, (list, tuple)):
            return type(value)(swap(v) for v in value)
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if dataclasses.is_dataclass(value) and hasattr(value, "packed"):
            return dataclasses.replace(value, **{f.name: swap(getattr(value, f.name)) for f in dataclasses.fields(value)})
        return value

    return swap(args), swap(kwargs), [replacement[id(t)] for t in tensors]


class StateWatch:
    """``contract.global_state`` before and after the call, on the call's own thread (torch's thread count and grad
    mode are per thread): ``changes`` names what the call left changed."""

    def __enter__(self):
        from lora_lab.conformance.judge.contract import global_state

        self.before, self.changes = global_state(), []
        return self

    def __exit__(self, *exc_info):
        from lora_lab.conformance.judge.contract import global_state, state_changes

        self.changes = state_changes(self.before, global_state())
        return False


class Entered:
    """Several contexts entered in order, left in reverse: what ``invoke`` runs the call inside."""

    def __init__(self, *contexts) -> None:
        self.contexts = [c for c in contexts if c is not None]

    def __enter__(self):
        for context in self.contexts:
            context.__enter__()
        return self

    def __exit__(self, *exc_info):
        for context in reversed(self.contexts):
            context.__exit__(*exc_info)
        return False


def same_values(after, before) -> bool:
    """The same shape, dtype and values (NaN equal to NaN)."""
    import torch

    if after.shape != before.shape or after.dtype != before.dtype:
        return False
    a = after.detach()
    return torch.equal(a, before) or (a.is_floating_point() and torch.equal(torch.nan_to_num(a), torch.nan_to_num(before)))


def wrap_interpreter_launch(mark: str, wrap):
    """Wrap Triton's interpreter launcher, ``GridExecutor.__call__``, with ``wrap(launch)``, once per ``mark``.

    Three things wrap it in the target's process: ``interpreted_launches`` (count), ``kernel_launches`` (record) and
    ``TailOfGrid`` (skip programs, for one call). Each wrapper carries the marks of those beneath it, so a kind is
    never wrapped twice however they are layered. Returns the class whose ``__call__`` was wrapped (or already was),
    None while the target has not imported Triton's interpreter.
    """
    import sys

    interpreter = sys.modules.get("triton.runtime.interpreter")
    executor = getattr(interpreter, "GridExecutor", None)
    if executor is None:
        return None
    launch = executor.__call__
    marks = getattr(launch, "_lora_lab_marks", frozenset())
    if mark not in marks:
        wrapper = wrap(launch)
        wrapper._lora_lab_marks = marks | {mark}
        executor.__call__ = wrapper
    return executor


_LAUNCHES = [0]


def interpreted_launches() -> int:
    """How many kernel launches Triton's interpreter (``TRITON_INTERPRET=1``) has run in this process so far.

    Counted by wrapping the interpreter's launcher the first time this is asked after the target imported Triton;
    0 while it has not."""

    def counting(launch):
        def counted(self, *args, **kwargs):
            _LAUNCHES[0] += 1
            return launch(self, *args, **kwargs)

        return counted

    wrap_interpreter_launch("counted", counting)
    return _LAUNCHES[0]


class TailOfGrid:
    """Under Triton's interpreter, run only the programs whose id on axis 0 is in the last part of each launch's grid:
    the part that holds elements ``first`` to ``numel`` when program p works on the p-th of ``grid[0]`` equal slices
    of them (``offs = pid * BLOCK + tl.arange(0, BLOCK)``, the exercises' layout). ``skipped`` counts the programs not
    run; 0 when none was (a GPU, a target without Triton, a Triton whose interpreter has another shape).

    Why: a float32 element index is wrong only past 2^24 elements, and the interpreter needs 10-20 s for a weight that
    large; the tail is a few hundred thousand elements, a second. The programs that ran wrote their elements exactly
    as in a full launch; the others wrote nothing, so whoever asks for this compares only elements ``first`` onwards,
    and runs the call again in full when that comparison fails (a correct kernel with another mapping of programs to
    elements: a grid-stride loop, a 2-D grid). A kernel cannot pass by it: it passes only with the right values past
    ``first``, computed by the programs that cover them.

    Entered on the call's thread. The interpreter's loop calls ``interpreter_builder.set_grid_dim`` once, then
    ``set_grid_idx`` and the kernel for each program: the launch is wrapped to see the grid and each program's id, and
    to skip the kernel for the ids before the tail (two programs of margin for slices that do not fall evenly).
    """

    MARGIN = 2

    def __init__(self, first: int, numel: int) -> None:
        self.first, self.numel, self.skipped = int(first), int(numel), 0
        self.executor = self.launch = None

    def __enter__(self):
        import sys

        interpreter = sys.modules.get("triton.runtime.interpreter")
        executor = getattr(interpreter, "GridExecutor", None)
        builder = getattr(interpreter, "interpreter_builder", None)
        if executor is None or not all(hasattr(builder, name) for name in ("set_grid_dim", "set_grid_idx")):
            return self
        self.launch = executor.__call__  # put back on exit
        self.executor = wrap_interpreter_launch("tail", lambda launch: self._tail_only(launch, builder))
        return self

    def _tail_only(self, launch, builder):
        """``launch`` running only the programs of the grid's tail (see the class docstring)."""
        tail = self

        def tail_only(grid_executor, *args, **kwargs):
            kernel, current = grid_executor.fn, [0, 0]
            set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx

            def program(**kernel_args):
                if current[0] >= current[1]:
                    return kernel(**kernel_args)
                tail.skipped += 1
                return None

            def grid_dim(x, y, z):  # called after the launch bound its arguments, just before its loop
                current[1] = max(0, x * tail.first // max(tail.numel, 1) - tail.MARGIN)
                grid_executor.fn = program
                return set_dim(x, y, z)

            def grid_idx(x, y, z):
                current[0] = x
                return set_idx(x, y, z)

            own = {name: vars(builder)[name] for name in ("set_grid_dim", "set_grid_idx") if name in vars(builder)}
            builder.set_grid_dim, builder.set_grid_idx = grid_dim, grid_idx
            try:
                return launch(grid_executor, *args, **kwargs)
            finally:
                for name in ("set_grid_dim", "set_grid_idx"):  # the builder as it was: its class's methods, usually
                    if name in own:
                        setattr(builder, name, own[name])
                    else:
                        delattr(builder, name)
                grid_executor.fn = kernel

        return tail_only

    def __exit__(self, *exc_info):
        if self.executor is not None:
            self.executor.__call__ = self.launch
        return False
