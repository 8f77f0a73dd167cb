"""``lora-lab``: the command line.

Each command lives in its own module, which defines ``add_arguments(parser)``
and ``run(args) -> int``; this file only lists them, so ``lora-lab --help``
stays fast (nothing heavy is imported until a command runs).

    lora-lab demo                 # the four steps of QLoRA on the embedded tiny model
    lora-lab size --preset llama-3.1-8b --r 32 --alpha 64
    lora-lab verify my_package.my_module
    lora-lab grade                # score your exercises/
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

# (command, module that implements it, one-line help)
COMMANDS = (
    ("demo", "lora_lab.cli.demo", "walk the four steps of one QLoRA training step on the tiny model"),
    ("size", "lora_lab.cli.size", "adapter and base-weight sizes for a model preset, from its config alone"),
    ("train", "lora_lab.finetune.command", "fine-tune with a progress bar, a loss chart and saved adapter files"),
    ("verify", "lora_lab.conformance.verify", "run the conformance suite on your implementation"),
    ("grade", "lora_lab.conformance.grade", "score the exercises in exercises/"),
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
    parser = argparse.ArgumentParser(
        prog="lora-lab",
        description="Learn, check and speed up QLoRA fine-tuning.",
        epilog="Run 'lora-lab COMMAND --help' for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in _available_commands():
        module = importlib.import_module(module_name)
        command = sub.add_parser(
            name, help=help_text, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)

