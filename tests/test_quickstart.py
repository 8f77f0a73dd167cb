"""The README's quickstart is what CI runs: torch's CPU wheel chosen explicitly, then the project from PyPI.

On PyPI, Linux's ``torch==2.13.0`` is the CUDA build, which pins ``triton==3.7.1``
and pulls about 3 GB of NVIDIA libraries; "pinned so that a CPU machine gets the
CPU wheel" held only where a CPU wheel happened to be served first. The quickstart
therefore names PyTorch's CPU index, and CI runs the same two installs.
"""

from __future__ import annotations

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
        assert 'pip install -e ".[dev]"' in command and 'pip install -q -e ".[dev]"' in ci


def test_the_pinned_torch_satisfies_the_project_requirement():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_requirement,) = [Requirement(d) for d in dependencies if Requirement(d).name == "torch"]
    pinned = re.search(r"torch==(\S+)", torch_install(quickstart_commands()[0])).group(1)
    assert torch_requirement.specifier.contains(pinned), f"{torch_requirement} refuses the quickstart's torch {pinned}"
