"""Run the test suite against today's newest dependencies and say which dependency changed what.

CI installs the versions recorded in ``constraints.txt``, so a new release of transformers, peft or bitsandbytes
cannot turn main red overnight. This command is the other half: it builds a fresh virtual environment with the
newest versions (the README's quickstart install without ``-c constraints.txt``), lists every version that differs
from the record, runs the README's test command, and, for each test that fails, puts each changed package back to
its recorded version in turn and runs the failing tests again: a package whose old version makes a failure go away is
named as its cause.

    python .ci/drift.py                 # newest versions: what changed, what fails, and which change breaks what
    python .ci/drift.py --refresh       # the same, then record the newest versions in constraints.txt if all pass
    python .ci/drift.py --venv /tmp/d   # build the environment elsewhere (default: .venv-drift)

It needs the package registries (PyPI and PyTorch's CPU index) and takes about as long as CI (10-15 minutes on
2 cores). torch stays at the README's pin: moving torch is a decision of its own, made in the README and here.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TEST_COMMAND = ["pytest", "--hypothesis-profile=ci", "-n", "2"]
HEADER = """\
# The versions CI resolved and tested (.ci/run installs with -c constraints.txt; so can the README's quickstart).
# Refresh: python .ci/drift.py --refresh (runs the suite on the newest versions and rewrites this file if it passes).
# torch is the README's pin; its CPU build's local version (+cpu) is left out so that a CUDA build satisfies it too.
"""


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): case and runs of - _ . folded."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str) -> dict[str, str]:
    """``name==version`` lines (pip freeze's format, comments allowed) as {canonical name: version}."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if match is None:
            raise ValueError(f"expected name==version, got {line!r}")
        pins[canonical(match.group(1))] = match.group(2).split("+", 1)[0]
    return pins


def version_changes(recorded: dict[str, str], newest: dict[str, str]) -> list[tuple[str, str | None, str | None]]:
    """(package, recorded version or None, newest version or None) for every package that differs, sorted by name."""
    names = sorted(set(recorded) | set(newest))
    return [(name, recorded.get(name), newest.get(name)) for name in names if recorded.get(name) != newest.get(name)]


def format_constraints(pins: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def failed_tests(junit_xml: Path) -> list[str]:
    """Node ids of the failed or errored tests in a pytest junit XML report."""
    failed = []
    for case in ElementTree.parse(junit_xml).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(node_id(case.get("classname", ""), case.get("name", "")))
    return failed


def node_id(classname: str, name: str, root: Path = ROOT) -> str:
    """pytest's node id from junit's dotted ``classname`` (``tests.cli.test_size.TestBounds``): the longest
    leading part that names a file is the module, the rest its classes."""
    parts = classname.split(".")
    for split in range(len(parts), 0, -1):
        path = "/".join(parts[:split]) + ".py"
        if (root / path).is_file():
            return "::".join([path, *parts[split:], name])
    return "::".join([classname, name])


def describe_change(name: str, old: str | None, new: str | None) -> str:
    if old is None:
        return f"{name}: new, {new}"
    if new is None:
        return f"{name}: {old}, no longer installed"
    return f"{name}: {old} -> {new}"


class DriftEnvironment:
    """A fresh virtual environment with the project installed at the newest versions of its dependencies."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.python = str(folder / "bin" / "python")

    def run(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([self.python, "-m", *args], cwd=ROOT, check=check, **kwargs)

    def create(self, torch_pin: str) -> None:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(self.folder)], check=True)
        self.run("pip", "install", "-q", "--upgrade", "pip")
        self.run("pip", "install", "-q", "--retries", "0", f"torch=={torch_pin}", "--index-url", CPU_INDEX)
        self.run("pip", "install", "-q", "--upgrade", "-e", ".[dev,compat]")

    def pins(self) -> dict[str, str]:
        frozen = self.run("pip", "freeze", "--exclude-editable", capture_output=True, text=True).stdout
        return parse_pins(frozen)

    def install(self, name: str, version: str) -> bool:
        return self.run("pip", "install", "-q", "--no-deps", f"{name}=={version}", check=False).returncode == 0

    def uninstall(self, name: str) -> None:
        self.run("pip", "uninstall", "-q", "-y", name, check=False)

    def failing(self, tests: list[str], report: Path) -> list[str]:
        self.run(*TEST_COMMAND, "-q", f"--junitxml={report}", *tests, check=False)
        return failed_tests(report)


def blame(env: DriftEnvironment, changes, failing: list[str], report: Path) -> dict[str, list[str]]:
    """For each changed package, the failing tests that pass again with its recorded version back."""
    causes = {}
    for name, old, new in changes:
        if old is None:  # a package the record does not have: uninstalling it is the way back
            env.uninstall(name)
        elif not env.install(name, old):
            print(f"  {name}: could not install the recorded {old}; not tried")
            continue
        fixed = sorted(set(failing) - set(env.failing(failing, report)))
        if fixed:
            causes[name] = fixed
        print(f"  {describe_change(name, old, new)}: back at {old or 'absent'}, {len(fixed)} of {len(failing)} pass again")
        if new is not None:
            env.install(name, new)
    return causes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python .ci/drift.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-drift", help="where to build the environment")
    parser.add_argument("--refresh", action="store_true", help="rewrite constraints.txt with the newest versions if all pass")
    args = parser.parse_args(argv)

    recorded = parse_pins(CONSTRAINTS.read_text())
    env = DriftEnvironment(args.venv.resolve())
    print(f"drift: building {env.folder} with the newest versions (torch stays at {recorded['torch']})", flush=True)
    env.create(recorded["torch"])
    newest = env.pins()
    changes = version_changes(recorded, newest)
    print(f"drift: {len(changes)} versions differ from constraints.txt")
    for name, old, new in changes:
        print(f"  {describe_change(name, old, new)}")

    report = env.folder / "drift-junit.xml"
    failing = env.failing([], report)
    if not failing:
        print("drift: the suite passes on the newest versions")
        if args.refresh:
            CONSTRAINTS.write_text(format_constraints(newest))
            print(f"drift: wrote {len(newest)} versions to {CONSTRAINTS.name}; commit it")
        elif changes:
            print("drift: python .ci/drift.py --refresh records them")
        return 0

    print(f"drift: {len(failing)} tests fail on the newest versions; putting each change back in turn:")
    causes = blame(env, changes, failing, report)
    explained = set()
    for name, fixed in causes.items():
        explained.update(fixed)
        print(f"drift: {describe_change(name, recorded.get(name), newest.get(name))} breaks {len(fixed)}:")
        print("".join(f"    {test}\n" for test in fixed), end="")
    unexplained = [test for test in failing if test not in explained]
    if unexplained:
        print(f"drift: {len(unexplained)} failures no single version explains (several changes together, or flaky):")
        print("".join(f"    {test}\n" for test in unexplained), end="")
    if args.refresh:
        print("drift: constraints.txt left as it was (the suite does not pass on the newest versions)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
