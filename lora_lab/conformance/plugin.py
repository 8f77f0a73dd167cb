"""pytest plugin (entry point ``pytest11``): the conformance suite as pytest items.

    pytest --lora-lab-impl my_package.qlora                 # every check on your code
    pytest --lora-lab-impl my_package.qlora --lora-lab-only nf4.   # only the NF4 checks

Each check becomes one item named ``TARGET::check.name``; operations the target
does not provide are skipped with a reason. As in ``lora-lab verify``, the target
runs in its own process (one warm process per target for the session), never in
pytest's. Loading this plugin also registers
the hypothesis profiles, so ``--hypothesis-profile=ci`` works everywhere.

With --lora-lab-impl and no test paths on the command line, only the conformance
items run: from a project's root, pytest would otherwise also collect the
project's own ``testpaths`` (from lora_lab's repository, its whole suite, over
ten minutes for five checks). Name paths to run them as well:
``pytest tests/test_mine.py --lora-lab-impl my_package.qlora``.
"""

from __future__ import annotations

import pytest

import lora_lab.conformance.judge.profiles  # noqa: F401  (registers ci / dev / thorough)
from lora_lab.conformance.isolation import sandbox


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lora_lab", "lora_lab conformance suite")
    group.addoption(
        "--lora-lab-impl", action="append", default=[], metavar="TARGET",
        help="run the conformance suite on TARGET (an importable module or module:attribute); repeatable",
    )
    group.addoption(
        "--lora-lab-only", action="append", default=[], metavar="PREFIX",
        help="with --lora-lab-impl: only checks whose name starts with PREFIX (e.g. 'nf4.'); repeatable",
    )
    group.addoption(
        "--lora-lab-sandbox", choices=sandbox.MODES, default=None,
        help="the targets' (and pytest exercises/'s learner files') processes in new namespaces: auto (default, "
        "$LORA_LAB_SANDBOX), require (refuse without every layer) or off; see lora-lab verify --help",
    )


def pytest_configure(config: pytest.Config) -> None:
    sandbox.use(config.getoption("lora_lab_sandbox"))
    if config.getoption("lora_lab_impl"):  # only then: every pytest run in an environment with lora_lab loads this
        from lora_lab.conformance.isolation.process import prepare_for_targets

        config.stash[_INSTALLATION] = sandbox.InstallationWatch()  # compared once the targets are closed
        prepare_for_targets()  # pytest and the targets' processes take turns: idle threads sleep, the fork server starts


class ConformanceFailure(Exception):
    """Raised by a conformance item whose check failed; carries the runner's Result."""


class ConformanceItem(pytest.Item):
    def __init__(self, *, target_name: str, check, **kwargs) -> None:
        super().__init__(**kwargs)
        self.target_name, self.check = target_name, check

    def runtest(self) -> None:
        from lora_lab.conformance.judge.profiles import command_profile
        from lora_lab.conformance.runner import NOT_PROVIDED, PASSED, run_check

        # The profile named by --hypothesis-profile, else ``ci`` as in ``lora-lab verify``: hypothesis' own
        # default has a 200 ms deadline, which a model-level check exceeds by design.
        profile = self.config.getoption("hypothesis_profile", default=None) or "ci"
        with command_profile(profile):
            result = run_check(self.check, _targets(self.config)[self.target_name])
        if result.status == NOT_PROVIDED:
            pytest.skip(f"{self.target_name} does not provide {', '.join(self.check.requires)}")
        if result.status != PASSED:
            raise ConformanceFailure(result)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ConformanceFailure):
            result = excinfo.value.args[0]
            return (
                f"{self.check.name} {result.status} on {self.target_name}\n"
                f"  property: {self.check.description}\n  detail:   {result.detail}\n  hint:     {self.check.hint}"
            )
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.target_name}::{self.check.name}"


def pytest_ignore_collect(collection_path, config: pytest.Config) -> bool | None:
    """With --lora-lab-impl, collect no test files unless the command line names them."""
    if config.getoption("lora_lab_impl") and config.args_source != pytest.Config.ArgsSource.ARGS:
        return True
    return None


_TARGETS = pytest.StashKey[dict]()
_INSTALLATION = pytest.StashKey[sandbox.InstallationWatch]()


def _targets(config: pytest.Config) -> dict:
    """The session's isolated targets by name, started at collection."""
    return config.stash.setdefault(_TARGETS, {})


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The targets closed, lora_lab's files and site-packages' startup hooks must be as they were: else no verdict."""
    for target in _targets(session.config).values():
        target.close()
    watch = session.config.stash.get(_INSTALLATION, None)
    tampered = watch.tampered() if watch is not None else None
    if tampered:
        session.config.get_terminal_writer().line(f"lora-lab: {tampered}; no verdict", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    targets = config.getoption("lora_lab_impl")
    if not targets:
        return
    from lora_lab.conformance.isolation.proxy import RemoteTarget
    from lora_lab.conformance.runner import all_checks

    only = config.getoption("lora_lab_only")
    for target_name in targets:
        try:
            _targets(config)[target_name] = RemoteTarget(target_name)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from exc
        for check in all_checks():
            if only and not any(check.name.startswith(prefix) for prefix in only):
                continue
            name = f"{target_name}::{check.name}"
            items.append(ConformanceItem.from_parent(session, name=name, target_name=target_name, check=check))
