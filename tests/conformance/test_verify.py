"""`lora-lab verify` and the pytest plugin: the suite's two doors for library authors."""

import json
import re
from pathlib import Path

import pytest

from lora_lab.cli import _available_commands, main

MUTANTS = Path(__file__).parents[1] / "mutants"


def test_verify_passes_the_reference_nf4_and_writes_json(tmp_path, capsys):
    report = tmp_path / "runs" / "report.json"  # a missing folder is made
    assert main(["verify", "lora_lab", "--only", "nf4.", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "PASS  nf4.bytes_match_bitsandbytes" in out
    results = {r["check"]: r["status"] for r in json.loads(report.read_text())["results"]}
    assert results.pop("nf4.format_codes_and_levels") == "not provided"  # lora_lab speaks NF4Tensor, no format of its own
    assert set(results.values()) == {"passed"} and len(results) >= 5


def test_verify_fails_a_broken_implementation_with_detail_and_hint(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(MUTANTS))
    assert main(["verify", "qlora_scaling_ignored", "--only", "qlora.forward"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  qlora.forward_matches_float64" in out
    assert "elements differ beyond the tolerance" in out and "hint:" in out and "scaling" in out


def test_missing_operations_are_not_provided_not_failed(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(MUTANTS))
    assert main(["verify", "nf4_low_nibble_first", "--only", "qlora."]) == 0
    assert "0 failed" in capsys.readouterr().out


def test_unknown_target_and_unknown_check_are_clear_errors(capsys):
    assert main(["verify", "no_such_package.qlora"]) == 2
    assert "expected an importable module" in capsys.readouterr().err
    assert main(["verify", "lora_lab", "--only", "nonsense"]) == 2
    captured = capsys.readouterr()
    assert "no check matches nonsense; the checks are: nf4.bytes_match_bitsandbytes" in captured.err and not captured.out


def test_only_takes_one_value_so_the_target_after_it_stays_the_target(capsys):
    """`--only nf4. lora_lab` once swallowed the target as a second prefix; commas or a repeated --only give several."""
    from lora_lab.cli import command_parser
    from lora_lab.conformance import verify

    parser = command_parser("verify", verify)
    args = parser.parse_args(["--only", "nf4.bytes", "lora_lab"])
    assert (args.target, args.only) == ("lora_lab", ["nf4.bytes"])
    args = parser.parse_args(["lora_lab", "--only", "nf4.bytes,qlora.forward", "--only", "loss."])
    assert args.only == ["nf4.bytes", "qlora.forward", "loss."]
    assert main(["verify", "--only", "nf4.bytes", "lora_lab"]) == 0
    assert "PASS  nf4.bytes_match_bitsandbytes" in capsys.readouterr().out


def test_every_command_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    listing = capsys.readouterr().out
    commands = [name for name, _, _ in _available_commands()]
    for command in commands:
        assert command in listing, f"'lora-lab --help' does not list {command}"
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: lora-lab " + command in capsys.readouterr().out


def test_pytest_plugin_runs_the_suite_as_items(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(MUTANTS))
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--hypothesis-profile=ci",
        "--lora-lab-impl", "lora_lab", "--lora-lab-impl", "nf4_low_nibble_first", "--lora-lab-only", "nf4.bytes",
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*nf4.bytes_match_bitsandbytes failed on nf4_low_nibble_first*", "*hint:*HIGH nibble*"])


def test_pytest_plugin_rejects_an_unknown_target(pytester):
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--lora-lab-impl", "no_such_package")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*expected an importable module*"])




def test_pytest_plugin_needs_no_profile_flag(pytester):
    """Without --hypothesis-profile the items use ``ci``, not hypothesis' default 200 ms deadline."""
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--lora-lab-impl", "lora_lab.targets.peft_bnb",
                                           "--lora-lab-only", "nf4.bytes")
    result.assert_outcomes(passed=1)


def test_pytest_plugin_runs_only_the_conformance_items_unless_paths_are_named(pytester):
    """From a project's root --lora-lab-impl once collected the project's own testpaths too (lora_lab's: 10 minutes)."""
    pytester.makeini("[pytest]\ntestpaths = tests\n")
    pytester.mkdir("tests")
    pytester.makepyfile(**{"tests/test_own": "def test_own():\n    pass\n"})
    only = ("-p", "no:cacheprovider", "--lora-lab-impl", "lora_lab", "--lora-lab-only", "adamw.first_step")  # no bitsandbytes:
    # inline runs drop the modules they imported, and bitsandbytes cannot register its torch ops twice
    pytester.runpytest(*only).assert_outcomes(passed=1)  # in this process: the plugin is already imported
    pytester.runpytest("tests/test_own.py", *only).assert_outcomes(passed=2)


def test_a_target_that_provides_nothing_fails(capsys):
    """`lora-lab verify os` printed "0 passed, 0 failed, 24 not provided" and exited 0: a typo passed CI forever."""
    assert main(["verify", "os"]) == 2
    assert "provides none of the operations" in capsys.readouterr().err


def test_reexported_lora_lab_code_is_flagged_and_the_report_names_the_files(tmp_path, monkeypatch, capsys):
    (tmp_path / "reexports_reference.py").write_text("from lora_lab.nf4 import *  # noqa: F403\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    report = tmp_path / "report.json"
    assert main(["verify", "reexports_reference", "--only", "nf4.rejects", "--json", str(report)]) == 0
    assert "lora_lab's own code, re-exported" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["origin"]["quantize_nf4"]["lora_lab"] is True and data["seed"] is None
    assert data["source_files"] == [str(tmp_path / "reexports_reference.py")] and len(data["sha256"]) == 64


def test_a_scored_run_prints_and_records_its_seed(tmp_path, capsys):
    report = tmp_path / "report.json"
    assert main(["verify", "lora_lab", "--only", "nf4.rejects", "--profile", "scored", "--json", str(report)]) == 0
    seed = json.loads(report.read_text())["seed"]
    assert f"inputs drawn from seed {seed}" in capsys.readouterr().out


def test_the_readmes_mutant_example_is_what_verify_prints(monkeypatch, capsys):
    """The README shows verify's output on a mutant; it stays true but for the time columns."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    command = "$ PYTHONPATH=tests/mutants lora-lab verify qlora_scaling_ignored --only qlora.forward\n"
    example = readme.split(command, 1)[1].split("```", 1)[0]
    monkeypatch.syspath_prepend(str(MUTANTS))
    assert main(["verify", "qlora_scaling_ignored", "--only", "qlora.forward"]) == 1

    def without_times(text: str) -> list[str]:
        return [" ".join(word for word in line.split() if not re.fullmatch(r"\d+\.\d+[sx]", word)) for line in text.splitlines()]

    assert without_times(capsys.readouterr().out) == without_times(example)


def test_an_operation_whose_every_check_is_not_supported_is_exit_2_naming_it_and_its_declarations(tmp_path, monkeypatch,
                                                                                                    capsys):
    """A format that declares no double-quant setting supported left every check "not supported" and exited 0."""
    (tmp_path / "supports_no_statistics.py").write_text(
        "from declares_nothing_supported import NF4_FORMAT, dequantize_nf4, quantize_nf4  # noqa: F401\n"
        "CAPABILITIES = {'double_quant': ((), 'no statistics at all')}\n")
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "adversarial"))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["verify", "supports_no_statistics", "--only", "nf4."]) == 2
    captured = capsys.readouterr()
    assert "0 passed, 0 failed" in captured.out
    for op in ("quantize_nf4", "dequantize_nf4"):
        assert f"lora-lab verify: {op}: all " in captured.err
    assert "'double_quant': ((), 'no statistics at all')" in captured.err


def test_the_kernels_package_has_its_source_files_though_an_editable_install_maps_it(tmp_path):
    """``lora_lab.kernels`` lives in the repository's ``kernels/`` (pyproject's package-dir). Its files are what tells
    the suite that a kernel target runs Triton (its interpreted calls escape the time budget), what a report hashes,
    and part of what the installation watch covers; looked up on sys.path alone, the package had none."""
    from lora_lab.kernels import common

    from lora_lab.conformance.isolation.origin import source_files

    files = source_files("lora_lab.kernels")
    assert Path(common.__file__).resolve() in {f.resolve() for f in files}
    assert all(f.suffix == ".py" for f in files) and source_files("lora_lab.no_such_module") == []


SLOW_DEQUANTIZE = '''
import time

from lora_lab.nf4 import dequantize_nf4 as reference
from lora_lab.nf4 import quantize_nf4  # noqa: F401

calls = 0


def dequantize_nf4(q):
    """lora_lab's dequantize, then a sleep of 99 times its own time: on the first call only, or on every call."""
    global calls
    calls += 1
    start = time.perf_counter()
    out = reference(q)
    if calls == 1 or EVERY_CALL:
        time.sleep(99 * (time.perf_counter() - start))
    return out
'''


@pytest.mark.parametrize(("every_call", "verdict"), [(False, 0), (True, 1)])
def test_one_slow_call_is_timed_again_and_a_slow_target_is_slow_twice(tmp_path, monkeypatch, capsys, every_call,
                                                                      verdict):
    """A call over the time budget can be the machine's (another process; the first touch of fresh memory, slow in
    a VM): a pure op's slow call is timed once more, beside the reference again, and the faster of each counts. A
    target 100x slower than the reference on its first call only passes; one slow on every call still fails."""
    (tmp_path / "slow_dequantize.py").write_text(f"EVERY_CALL = {every_call}\n" + SLOW_DEQUANTIZE)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["verify", "slow_dequantize", "--only", "nf4.dequantize_realistic_size"]) == verdict
    out = capsys.readouterr().out
    assert ("over the time budget" in out) == every_call, out
