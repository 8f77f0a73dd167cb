"""``lora-lab``: the command line.

Each command lives in its own module, which defines ``add_arguments(parser)``
and ``run(args) -> int``; this file only lists them. A command's module is
imported only when that command runs, so ``lora-lab --help`` and a mistyped
command answer at once, without importing torch.

    lora-lab demo                 # the four steps of QLoRA on the embedded tiny model
    lora-lab size --preset llama-3.1-8b --r 32 --alpha 64
    lora-lab verify my_package.my_module
    lora-lab grade                # score your exercises/
"""

from __future__ import annotations

import _thread
import argparse
import importlib
import importlib.util
import os
import signal
import sys
import threading
import time

# (command, module that implements it, one-line help)
COMMANDS = (
    ("demo", "lora_lab.cli.demo", "walk the four steps of one QLoRA training step on the tiny model"),
    ("size", "lora_lab.cli.size", "adapter and base-weight sizes for a model preset, from its config alone"),
    ("train", "lora_lab.finetune.command", "fine-tune with a progress bar, a loss chart and saved adapter files"),
    ("verify", "lora_lab.conformance.verify", "run the conformance suite on your implementation"),
    ("grade", "lora_lab.conformance.grading.command", "score the exercises in exercises/"),
    ("bench", "lora_lab.bench.command", "correctness and speed of the QLoRA layer and kernels against baselines"),
)


def _available_commands():
    for name, module_name, help_text in COMMANDS:
        try:
            spec = importlib.util.find_spec(module_name)
        except ModuleNotFoundError:
            spec = None
        if spec is not None:
            yield name, module_name, help_text


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: lists the commands from ``COMMANDS`` alone, importing none of their modules."""
    parser = argparse.ArgumentParser(
        prog="lora-lab",
        description="Learn, check and speed up QLoRA fine-tuning.",
        epilog="Run 'lora-lab COMMAND --help' for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, _, help_text in _available_commands():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_parser(name: str, module) -> argparse.ArgumentParser:
    """The parser of one command, ``prog`` ``lora-lab NAME``: its usage errors show that command's usage."""
    parser = argparse.ArgumentParser(
        prog=f"lora-lab {name}", description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    module.add_arguments(parser)
    return parser


# Commands that close every process they start before they return. After them the program ends at once, once its
# output is flushed: the interpreter's teardown would take 0.7 s on 2 cores after the last line is printed, its final
# collections walking every object that torch, hypothesis and the suite made, only to free memory that the process
# returns anyway.
EXIT_AT_ONCE = ("grade", "verify")
RESEND_DELAY_S = 0.05  # a lost Ctrl-C is sent again this long after (_resending_lost_interrupts)


def console() -> None:
    """The ``lora-lab`` program: ``main``, then exit (at once after ``EXIT_AT_ONCE``'s commands)."""
    code = main()
    if sys.argv[1:2] and sys.argv[1] in EXIT_AT_ONCE:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _resending_lost_interrupts(previous):
    """A ``sys.unraisablehook`` that sends a lost Ctrl-C again, and leaves everything else to ``previous``.

    A KeyboardInterrupt raised inside a garbage collector's callback (hypothesis keeps one, and the checks collect
    often) cannot propagate: Python prints it as "Exception ignored" and goes on, so the command ran to its end.
    Sent again a moment later, once the callback has returned, to the main thread (a real signal, so that it also
    ends a wait for a child's reply), it ends the command like any Ctrl-C. The sending thread is started with
    ``_thread``: ``threading``'s start waits for it, and a signal handled in that wait, inside this hook, would be
    lost as well.
    """

    def hook(unraisable) -> None:
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            _thread.start_new_thread(_interrupt_soon, (threading.main_thread().ident,))
        else:
            previous(unraisable)

    return hook


def _interrupt_soon(thread_id: int) -> None:
    time.sleep(RESEND_DELAY_S)
    signal.pthread_kill(thread_id, signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status.

    Ctrl-C ends any command with one line and status 130 (128 + SIGINT, what a shell reports for it), never a
    traceback: each command closes the processes it started in ``finally`` blocks as the KeyboardInterrupt passes.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    modules = {name: module_name for name, module_name, _ in _available_commands()}
    if argv and argv[0] in modules:
        previous_hook, sys.unraisablehook = sys.unraisablehook, _resending_lost_interrupts(sys.unraisablehook)
        try:
            module = importlib.import_module(modules[argv[0]])
            return int(module.run(command_parser(argv[0], module).parse_args(argv[1:])) or 0)
        except KeyboardInterrupt:
            print(f"\nlora-lab {argv[0]}: interrupted", file=sys.stderr)
            return 130
        finally:
            sys.unraisablehook = previous_hook
    parser = build_parser()
    parser.parse_args(argv)  # --help exits 0; an unknown command or option exits 2 with the top-level usage
    parser.print_help(sys.stderr)  # no command given
    return 2
