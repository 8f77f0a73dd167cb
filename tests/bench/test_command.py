"""``lora-lab bench`` as a command: fast --help, usage errors that name the flag, no silent interpreted run,
Ctrl-C without a traceback, a partial run kept apart from the day's results, and the three ratios it prints."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_lab.bench import command, runner
from lora_lab.bench.cases import DTYPES
from lora_lab.bench.impls import IMPLS
from lora_lab.bench.names import DTYPE_NAMES, IMPL_NAMES
from lora_lab.bench.report import baseline_lines
from lora_lab.bench.timing import Record, validate_results
from lora_lab.cli import command_parser, main

TINY = ["--cpu", "--threads", "1", "--shapes", "128x48", "--tokens", "5", "--ranks", "4", "--repeats", "2", "--input-sets", "2"]


def test_the_command_line_names_are_the_registries_names():
    assert tuple(DTYPES) == DTYPE_NAMES and tuple(IMPLS) == IMPL_NAMES


def test_help_imports_no_torch():
    """--help took 4.9 s when the command imported torch and the implementations to list its flags."""
    probe = ("import sys\nfrom lora_lab.cli import main\ntry:\n    main(['bench', '--help'])\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--repeats" in done.stdout and done.stdout.strip().endswith("False")


@pytest.mark.parametrize("flag, value", [("--repeats", "0"), ("--repeats", "two"), ("--input-sets", "-1"),
                                         ("--tokens", "0"), ("--shapes", "100x5")])
def test_a_bad_number_names_the_flag_the_value_and_what_is_expected(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and repr(value) in err and "expected" in err and "_positive" not in err


def test_fused_on_a_cpu_is_refused_up_front_with_an_estimate(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path = tmp_path / "r.json"
    assert main(["bench", *TINY, "--impls", "fused", "--json", str(path)]) == 2
    err = capsys.readouterr().err
    assert "interpreter" in err and "about 6 minutes for these 3 case(s)" in err and "--interpreted" in err
    assert not path.exists()


def test_interpreted_says_the_estimate_before_it_starts(monkeypatch, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")

    def stop(*args):
        raise KeyboardInterrupt  # as soon as measuring would start: the warning must already be out

    monkeypatch.setattr(runner, "run_layers", stop)
    argv = ["bench", *TINY, "--impls", "fused", "--interpreted", "--json", str(tmp_path / "r.json")]
    assert main(argv) == 130
    assert "warning: the fused Triton kernels on a CPU run under Triton's interpreter" in capsys.readouterr().err


def test_ctrl_c_is_one_line_exit_130_and_leaves_the_results_file_alone(monkeypatch, tmp_path, capsys):
    path = tmp_path / "day.json"
    path.write_text('{"the": "day\'s full results"}\n')
    real = runner.run_layers

    def one_case_then_ctrl_c(cases, *args):
        real(cases[:1], *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_layers", one_case_then_ctrl_c)
    assert main(["bench", *TINY, "--no-model", "--no-nf4", "--impls", "reference", "--json", str(path)]) == 130
    err = capsys.readouterr().err  # the progress bar's lines, then one line
    assert "Traceback" not in err and err.endswith(f"interrupted (Ctrl-C); the results so far are in "
                                                   f"{tmp_path / 'day.incomplete.json'}; {path} was not written\n")
    assert json.loads(path.read_text()) == {"the": "day's full results"}
    kept = json.loads((tmp_path / "day.incomplete.json").read_text())
    assert validate_results(kept) == [] and len(kept["records"]) == 1


def test_ctrl_c_before_measuring_is_one_line_too(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    assert main(["bench"]) == 130
    assert capsys.readouterr().err == "lora-lab bench: interrupted (Ctrl-C)\n"


@pytest.mark.parametrize("argv, tag", [([], ""), (["--vocab-step"], ""), (["--impls", "reference"], "-partial"),
                                       (["--no-model"], "-partial"), (["--shapes", "128x48"], "-partial")])
def test_a_selection_is_written_beside_the_days_results_not_over_them(argv, tag):
    args = command_parser("bench", command).parse_args(argv)
    path = runner.results_path(args, "CPU AMD EPYC", "2026-12-06", quick=False)
    assert path.name == f"2026-12-06-cpu-amd-epyc{tag}.json"


def _record(scope, op, impl, ms, floor_ms=None):
    return Record(op=op, M=16, N=4, K=4, r=0, dtype="fp32", impl=impl, ms=ms, tflops=0.0, gbps=1.0, peak_mem_mb=0.0,
                  max_rel_err=0.0, scope=scope, floor_ms=floor_ms)


def test_the_schema_takes_storage_and_vocabulary_records_and_summarize_reads_them(tmp_path, capsys):
    """A --vocab-step run used to write records that benchmarks/summarize.py then rejected."""
    records = [_record("storage", "dequantize", "reference", 2.0, 1.0), _record("model", "step-vocab-128k", "full logits", 3.0)]
    results = {"device": "x", "date": "2026-12-06", "torch": "2", "triton": "3", "records": [r.to_json() for r in records]}
    assert validate_results(results) == []
    (tmp_path / "r.json").write_text(json.dumps(results))
    spec = importlib.util.spec_from_file_location("summarize", Path(__file__).resolve().parents[2] / "benchmarks/summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    assert summarize.main([str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "**NF4 dequantize of one weight" in out and "**Training step with Llama 3's 128,256-token vocabulary**" in out
    results["records"][0]["scope"] = "kernel"
    assert any("scope must be one of" in p for p in validate_results(results))


def test_the_three_ratios_side_by_side():
    records = [
        _record("storage", "quantize", "reference", 100.0, 3.0), _record("storage", "quantize", "bitsandbytes", 400.0, 3.0),
        _record("storage", "dequantize", "reference", 40.0, 4.0), _record("storage", "dequantize", "bitsandbytes", 30.0, 4.0),
        _record("storage", "dequantize", "fresh output", 25.0, 4.0),
        _record("model", "step", "reference", 6.0), _record("model", "step", "bnb+peft", 8.0),
    ]
    header, quantize, dequantize, step = baseline_lines(records)
    assert "bitsandbytes and peft" in header
    assert "0.25x bitsandbytes' time" in quantize
    assert "1.33x bitsandbytes' time" in dequantize and "10x its memory-bound estimate" in dequantize
    assert "1.6x writing a fresh output" in dequantize
    assert "0.75x peft + bitsandbytes' time" in step
