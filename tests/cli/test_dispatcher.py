"""The ``lora-lab`` dispatcher: help without torch, each command's own usage on a bad flag, errors on stderr."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lora_lab.cli import main

PROBE = """
import sys
from lora_lab.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exit_:
    status = exit_.code
print("torch imported" if "torch" in sys.modules else "torch not imported", file=sys.stderr)
sys.exit(status)
"""


@pytest.mark.parametrize(
    "argv, status, usage",
    [
        (["--help"], 0, "usage: lora-lab [-h] COMMAND"),
        ([], 2, "usage: lora-lab [-h] COMMAND"),
        (["demo", "--help"], 0, "usage: lora-lab demo"),
        (["demo", "--stepz"], 2, "usage: lora-lab demo"),
        (["demo", "--steps", "-1"], 2, "lora-lab demo: error: argument --steps: expected a whole number >= 0, got '-1'"),
        (["demo", "--threads", "many"], 2, "usage: lora-lab demo"),
        (["train", "--stepz"], 2, "usage: lora-lab train"),
        (["train", "--steps", "0"], 2, "lora-lab train: error: argument --steps: expected a whole number >= 1, got '0'"),
        (["verify", "--only", "nf4.", "lora_lab", "extra"], 2, "usage: lora-lab verify"),
        (["grade", "--only", "99"], 2, "usage: lora-lab grade"),
    ],
)
def test_help_and_usage_errors_answer_without_importing_torch(argv, status, usage):
    """torch takes 6-30 s to import on a busy small machine: none of these need it."""
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stderr
    text = done.stdout + done.stderr
    assert usage in text
    assert "torch not imported" in done.stderr
    if status:  # an error: the whole message goes to stderr, nothing to stdout
        assert usage in done.stderr and not done.stdout


def test_demo_names_the_flag_that_is_out_of_range(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--lr", "0"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == "lora-lab demo: error: argument --lr: expected a number > 0, got '0'"
    assert not captured.out


def test_size_errors_go_to_stderr(capsys):
    assert main(["size", "--preset", "llama-9b"]) == 2
    captured = capsys.readouterr()
    assert "unknown preset 'llama-9b'" in captured.err and not captured.out

