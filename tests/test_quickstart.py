"""The README's quickstart is what CI runs: torch's CPU wheel chosen explicitly, then the project from PyPI.

On PyPI, Linux's ``torch==2.13.0`` is the CUDA build, which pins ``triton==3.7.1``
and pulls about 3 GB of NVIDIA libraries; "pinned so that a CPU machine gets the
CPU wheel" held only where a CPU wheel happened to be served first. The quickstart
therefore names PyTorch's CPU index, and CI runs the same two installs.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def quickstart_commands() -> list[str]:
    """The two commands in the README's Quickstart section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def torch_install(command: str) -> str:
    installs = [part.strip() for part in command.split("&&") if "pip install" in part and "torch" in part]
    assert len(installs) == 1, f"expected one torch install in {command!r}"
    return installs[0]


def test_the_quickstart_installs_the_cpu_torch_wheel_explicitly_and_ci_runs_the_same():
    commands = quickstart_commands()
    assert len(commands) == 2 and commands[0].endswith("lora-lab demo")
    assert commands[1].endswith("pytest --hypothesis-profile=ci -n 2")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\npytest --hypothesis-profile=ci -n 2\n" in ci, ".ci/run must run the README's test command"
    for command in commands:
        install = torch_install(command)
        assert f"--index-url {CPU_INDEX}" in install, f"{install!r} lets PyPI's CUDA build in"
        pinned = re.search(r"torch==(\S+)", install).group(1)
        assert f"torch=={pinned} --index-url {CPU_INDEX}" in ci, ".ci/run must install torch as the README does"
    demo_install, test_install = (command.split(" && ")[-2] for command in commands)
    assert demo_install == 'pip install -c constraints.txt -e ".[dev]"'
    assert test_install == 'pip install -c constraints.txt -e ".[dev,compat]"', "the tests need the compat targets"
    assert 'python -m pip install -q -c constraints.txt -e ".[dev,compat]"' in ci, ".ci/run must install as the README does"


def test_the_recorded_versions_satisfy_the_project_and_pin_the_readmes_torch():
    """constraints.txt pins every dependency (and extra) the project declares, within what pyproject.toml accepts."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    drift = load_drift()
    pins = drift.parse_pins((ROOT / "constraints.txt").read_text())
    requirements = [Requirement(d) for d in project["dependencies"] + project["optional-dependencies"]["dev"]]
    requirements += [Requirement(d) for d in project["optional-dependencies"]["compat"]]
    for requirement in requirements:
        name = drift.canonical(requirement.name)
        assert name in pins, f"constraints.txt does not record {requirement.name}"
        assert requirement.specifier.contains(pins[name]), f"constraints.txt's {name}=={pins[name]} breaks {requirement}"
    pinned = re.search(r"torch==(\S+)", torch_install(quickstart_commands()[0])).group(1)
    assert pins["torch"] == pinned


def load_drift():
    spec = importlib.util.spec_from_file_location("drift", ROOT / ".ci" / "drift.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_drift_names_each_change_and_reads_pytests_failures(tmp_path):
    drift = load_drift()
    recorded = drift.parse_pins("# comment\ntransformers==5.24.0\nPyYAML==6.0.4\ntorch==2.13.0+cpu\nold-thing==1.0\n")
    assert recorded == {"transformers": "5.24.0", "pyyaml": "6.0.4", "torch": "2.13.0", "old-thing": "1.0"}
    newest = {"transformers": "5.25.0", "pyyaml": "6.0.4", "torch": "2.13.0", "kernels": "0.19.1"}
    changes = drift.version_changes(recorded, newest)
    assert changes == [("kernels", None, "0.19.1"), ("old-thing", "1.0", None), ("transformers", "5.24.0", "5.25.0")]
    assert [drift.describe_change(*change) for change in changes] == [
        "kernels: new, 0.19.1", "old-thing: 1.0, no longer installed", "transformers: 5.24.0 -> 5.25.0"]
    assert drift.parse_pins(drift.format_constraints(newest)) == newest
    with pytest.raises(ValueError, match="expected name==version"):
        drift.parse_pins("transformers>=5\n")
    report = tmp_path / "junit.xml"
    report.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_quickstart" name="test_a"/>'
        '<testcase classname="tests.test_quickstart" name="test_b[x]"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_quickstart.TestGroup" name="test_c"><error message="bang"/></testcase>'
        '</testsuite></testsuites>'
    )
    assert drift.failed_tests(report) == ["tests/test_quickstart.py::test_b[x]", "tests/test_quickstart.py::TestGroup::test_c"]


def test_the_pinned_torch_satisfies_the_project_requirement():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_requirement,) = [Requirement(d) for d in dependencies if Requirement(d).name == "torch"]
    pinned = re.search(r"torch==(\S+)", torch_install(quickstart_commands()[0])).group(1)
    assert torch_requirement.specifier.contains(pinned), f"{torch_requirement} refuses the quickstart's torch {pinned}"
