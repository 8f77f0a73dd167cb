"""A new user's first hour (#23): every mistake is answered before any work, in one line naming the flag and value.

Each case here was a real report: an --out that is a file trained for a minute
and then ended in a traceback, --eval-size 100000 held a run at 100% for
minutes, --dropout 1.5 got a line naming no flag, and Ctrl-C printed
tracebacks, some from the target's process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_dispatcher import PROBE  # one command run as `lora-lab` runs it, saying whether torch was imported

from lora_lab.cli import main

UNWRITABLE = "/proc/lora-lab-first-hour"  # nothing can be created in /proc, not even by root
needs_proc = pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux's /proc")


def _probe(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "README.md"
    path.write_text("not a folder\n")
    return path


EXPECTED = {
    "demo": "a folder to write loss.png into",
    "train": "a folder to write adapter/, loss.png, prices.png, metrics.json and resume.pt into",
    "verify": "a file name to write the results into",
    "grade": "a file name to write the grades into",
}


@needs_proc
@pytest.mark.parametrize(
    "command, flag, where",
    [(command, "--out", where) for command in ("demo", "train") for where in ("a file", "unwritable")]
    + [(command, "--json", where) for command in ("verify", "grade") for where in ("a folder", "unwritable")],
)
def test_output_paths_are_refused_before_any_work(tmp_path, a_file, command, flag, where):
    """A file for a folder, a folder for a file, or a place nothing can be written: one line, exit 2, torch unimported."""
    value = {"a file": "README.md", "a folder": str(tmp_path), "unwritable": UNWRITABLE}[where]
    argv = [command, *(["lora_lab"] if command == "verify" else []), flag, value]
    before = sorted(p.name for p in tmp_path.iterdir())
    done = _probe(argv, tmp_path)
    assert done.returncode == 2, done.stderr
    line = done.stderr.splitlines()[0]
    problem = {"a file": "is a file", "a folder": "is a folder", "unwritable": "cannot be written (/proc is not writable)"}
    assert line == f"lora-lab {command}: {flag} {value} {problem[where]}; expected {EXPECTED[command]}"
    assert done.stderr.splitlines()[1:] == ["torch not imported"] and not done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing was written, not even a probe's file


def test_a_path_below_a_file_is_refused(tmp_path, a_file):
    done = _probe(["demo", "--out", "README.md/run"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == ("lora-lab demo: --out README.md/run: README.md is a file, so nothing can be "
                                           "created under it; expected a folder to write loss.png into")


def test_no_plot_needs_no_out_folder():
    """demo --no-plot writes nothing, so its --out is not checked (it is still parsed)."""
    from lora_lab.cli import command_parser, demo

    args = command_parser("demo", demo).parse_args(["--no-plot", "--out", UNWRITABLE])
    assert args.no_plot and str(args.out) == UNWRITABLE


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--lr", "-1"], "argument --lr: expected a number > 0, got '-1'"),
        (["train", "--dropout", "1.5"], "argument --dropout: expected a number in [0, 1), got '1.5'"),
        (["train", "--warmup-ratio", "2"], "argument --warmup-ratio: expected a number in [0, 1), got '2'"),
        (["train", "--alpha", "nan"], "argument --alpha: expected a number > 0, got 'nan'"),
        (["train", "--eval-size", "100000"], "argument --eval-size: expected a whole number from 1 to 2000 (each of a run's 7 "
                                             "evaluations prices them all), got '100000'"),
        (["train", "--nproc", "0"], "argument --nproc: expected a whole number >= 1, got '0'"),
        (["demo", "--lr", "-1"], "argument --lr: expected a number > 0, got '-1'"),
        (["demo", "--r", "0"], "argument --r: expected a whole number >= 1, got '0'"),
        (["size", "--batch", "0"], "argument --batch: expected a whole number from 1 to 4096, got '0'"),
        (["size", "--sequence", "10000000"], "argument --sequence: expected a whole number from 2 to 131072 (Llama 3.1's "
                                            "context length), got '10000000'"),
    ],
)
def test_each_bad_number_names_its_flag_and_value(capsys, argv, message):
    """argparse answers before the command runs: the last stderr line names the flag, the value and the range."""
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and time.perf_counter() - started < 1
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == f"lora-lab {argv[0]}: error: {message}" and not captured.out


def test_size_bounds_the_rank_by_the_smallest_targeted_layer(capsys):
    assert main(["size", "--r", "1000000000"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == ("lora-lab size: expected the rank r from 1 to 1024, the smaller side of k_proj "
                                    "(1024 x 4096) in llama-3.1-8b; got 1000000000") and not captured.out
    assert main(["size", "--r", "1024", "--targets", "k_proj"]) == 0  # the bound itself is a rank


@pytest.mark.parametrize(
    "source, what",
    [('raise ValueError("boom")\n', "ValueError: boom"),
     ("import os\nos._exit(3)\n", "the target's process died during importing the target: exit status 3")],
)
def test_verify_says_which_module_failed_while_importing(tmp_path, monkeypatch, capsys, source, what):
    """It once printed only "boom" (and a traceback for a target whose import ends its process)."""
    (tmp_path / "first_hour_fails_at_import.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["verify", "first_hour_fails_at_import"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"lora-lab verify: error while importing first_hour_fails_at_import: {what}"
    assert not captured.out


def _interrupt(argv: list[str], marker: str, env: dict) -> subprocess.CompletedProcess:
    """Run ``lora-lab ARGV``, press Ctrl-C once ``marker`` is printed (SIGINT to its process group, as a terminal does).

    Ctrl-C again each few seconds while it runs: one that lands in a garbage-collector callback is swallowed by Python.
    """
    process = subprocess.Popen([sys.executable, "-m", "lora_lab.cli", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True, env={**os.environ, **env})
    out = ""
    while marker not in out:
        line = process.stdout.readline()
        assert line, f"{argv} ended before printing {marker!r}"
        out += line
    for _ in range(10):
        os.killpg(process.pid, signal.SIGINT)
        try:
            rest, err = process.communicate(timeout=5)
            return subprocess.CompletedProcess(argv, process.returncode, out + rest, err)
        except subprocess.TimeoutExpired:
            continue
    process.kill()
    raise AssertionError(f"{argv} did not stop on Ctrl-C")


def test_ctrl_c_ends_demo_with_one_line_and_status_130(tmp_path):
    done = _interrupt(["demo", "--steps", "100000", "--no-plot", "--pretrain-steps", "0"], "FINE-TUNING",
                      {"LORA_LAB_CACHE": str(tmp_path)})
    assert done.returncode == 130
    assert done.stderr.splitlines()[-1] == "lora-lab demo: interrupted" and "Traceback" not in done.stderr


def test_ctrl_c_ends_verify_without_a_traceback_from_any_process(tmp_path):
    """The target's and the oracles' processes get the terminal's SIGINT too: the suite closes them, quietly."""
    done = _interrupt(["verify", "lora_lab"], "PASS", {})
    assert done.returncode == 130
    assert done.stderr.splitlines()[-1] == "lora-lab verify: interrupted" and "Traceback" not in done.stderr


LOST_IN_GC = """
import gc, sys, time
from lora_lab.cli import _resending_lost_interrupts

fired = []

def callback(phase, info):
    if not fired:
        fired.append(phase)
        raise KeyboardInterrupt  # as a Ctrl-C that arrives while a garbage collector's callback runs

sys.unraisablehook = _resending_lost_interrupts(sys.unraisablehook)
gc.callbacks.append(callback)
try:
    gc.collect()  # Python reports the KeyboardInterrupt as unraisable and goes on
    gc.callbacks.remove(callback)
    time.sleep(10)
except KeyboardInterrupt:
    print("interrupted after", fired)
"""


def test_a_ctrl_c_lost_in_a_garbage_collector_callback_is_sent_again():
    """Such a Ctrl-C once printed "Exception ignored ... KeyboardInterrupt", and verify then ran to its end."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LOST_IN_GC], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "interrupted after ['start']" and not done.stderr
    assert time.perf_counter() - started < 8
