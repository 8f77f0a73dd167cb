"""The target's process in its sandbox (lora_lab/conformance/isolation/sandbox.py): what a hostile target tries from
there fails, nothing it starts outlives it, and ``--sandbox require`` refuses to run without every layer."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from lora_lab.conformance.errors import TargetImportError
from lora_lab.conformance.isolation import sandbox
from lora_lab.conformance.isolation.process import prepare_for_targets
from lora_lab.conformance.isolation.proxy import RemoteTarget

HERE = Path(__file__).parent
LINUX_NAMESPACES = os.path.exists("/proc/self/ns/user")


def leftovers() -> list[str]:
    """Processes on this machine named as the probe names the one it leaves behind."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "lora-lab-leftov":
                found.append(pid)
        except OSError:
            pass
    return found


@pytest.mark.skipif(not LINUX_NAMESPACES, reason="the sandbox needs Linux namespaces")
def test_a_sandboxed_target_reaches_neither_the_suite_nor_the_machine(monkeypatch):
    listener = socket.create_server(("127.0.0.1", 0))
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("PROBE_SUITE_PID", str(os.getpid()))
    monkeypatch.setenv("PROBE_PORT", str(listener.getsockname()[1]))
    monkeypatch.setenv(sandbox.MODE_ENV, "require")
    prepare_for_targets()
    target = RemoteTarget("reach_the_suite")
    try:
        reached = target.declaration("LIBRARIES")
        assert set(target.hello["sandbox"]["layers"]) == set(sandbox.LAYERS) and not target.hello["sandbox"]["missing"]
    finally:
        target.close()
        listener.close()
    assert reached["sandboxed"] is True
    assert reached["signal"].startswith(("ProcessLookupError", "PermissionError")), reached
    assert reached["ptrace"].startswith(("ProcessLookupError", "PermissionError")), reached
    assert reached["memory"].startswith(("FileNotFoundError", "PermissionError")), reached
    for place in ("project", "site-packages"):
        assert "Read-only file system" in reached[place], reached
    assert reached["network"].startswith("OSError"), reached  # no route: the namespace has no network
    assert reached["private tmp"] == "done" and max(reached["processes"]) < 10, reached
    assert not (Path(__import__("lora_lab").__file__).parent / "zz_probe.py").exists()
    assert reached["leftover"] == "done" and not leftovers(), "a process the target started outlived it"


def test_the_hostile_target_still_loses_its_check_in_verify(monkeypatch, capsys):
    from lora_lab.cli import main

    monkeypatch.syspath_prepend(str(HERE))
    assert main(["verify", "reach_the_suite", "--only", "loss.matches_shift_and_mask"]) == 1
    assert "FAIL  loss.matches_shift_and_mask" in capsys.readouterr().out


def test_off_runs_the_target_as_a_plain_process(monkeypatch):
    monkeypatch.setenv(sandbox.MODE_ENV, "off")
    target = RemoteTarget("lora_lab")
    try:
        assert target.hello["sandbox"]["layers"] == [] and set(target.hello["sandbox"]["missing"]) == set(sandbox.LAYERS)
    finally:
        target.close()


class RefusingLibc:
    """A kernel that offers no namespaces (a container's seccomp profile, say)."""

    def unshare(self, flags: int) -> int:
        return -1

    def prctl(self, *args) -> int:
        return 0


def test_require_refuses_where_a_layer_is_missing_and_auto_goes_on_without_it(monkeypatch):
    monkeypatch.setattr(sandbox, "_libc", RefusingLibc)
    with pytest.raises(sandbox.SandboxUnavailable, match="--sandbox require.*user namespace.*--sandbox auto"):
        sandbox.enter("require", keep_fds=())
    report = sandbox.enter("auto", keep_fds=())  # refused before any fork: this process is still the caller
    assert report["layers"] == [] and set(report["missing"]) == set(sandbox.LAYERS)


def test_require_on_a_machine_without_namespaces_is_a_clear_error_before_the_target_is_imported(monkeypatch, tmp_path):
    """The refusal reaches the suite as the target's import error, and the target's file never ran."""
    marker = tmp_path / "imported"
    (tmp_path / "marks_import.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(sandbox.MODE_ENV, "require")
    monkeypatch.setenv("LORA_LAB_SPAWN", "1")  # a fresh interpreter, where the refusing kernel below is installed
    monkeypatch.setenv("PYTHONPATH", str(HERE / "_no_namespaces"))
    with pytest.raises(TargetImportError, match="--sandbox require"):
        RemoteTarget("marks_import")
    assert not marker.exists()


def test_unknown_mode_names_the_choices(monkeypatch):
    monkeypatch.setenv(sandbox.MODE_ENV, "maybe")
    with pytest.raises(ValueError, match="expected one of auto, require, off"):
        sandbox.mode()


DROPS_A_PTH = '''
"""Drops a startup hook into the first site-packages folder on its path (every later run would import it)."""
import sys
from pathlib import Path

site = next(p for p in sys.path if p.endswith("site-packages"))
try:
    Path(site, "zz_every_later_run.pth").write_text("import os\\n")
except OSError:
    pass  # read-only in the sandbox


def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    raise RuntimeError("never reached by a verdict that counts")
'''


def fake_site_packages(tmp_path, monkeypatch) -> Path:
    site = tmp_path / "lib" / "site-packages"
    site.mkdir(parents=True)
    (tmp_path / "drops_a_pth.py").write_text(DROPS_A_PTH)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(site))
    return site


def test_a_run_that_changed_the_installation_gives_no_verdict(tmp_path, monkeypatch, capsys):
    """Unsandboxed (--sandbox off), a target's startup hook lands in site-packages: verify notices and exits 2."""
    from lora_lab.cli import main

    site = fake_site_packages(tmp_path, monkeypatch)
    monkeypatch.setenv(sandbox.MODE_ENV, "auto")  # restored after the test: --sandbox sets it for the command's process
    assert main(["verify", "drops_a_pth", "--only", "adamw.", "--sandbox", "off"]) == 2
    assert (site / "zz_every_later_run.pth").exists()
    assert "the installation changed during the run" in capsys.readouterr().err


def test_in_the_sandbox_the_same_target_changes_nothing(tmp_path, monkeypatch, capsys):
    from lora_lab.cli import main

    site = fake_site_packages(tmp_path, monkeypatch)
    assert main(["verify", "drops_a_pth", "--only", "adamw."]) == 1  # its adamw_step raises: an error, a verdict
    assert not (site / "zz_every_later_run.pth").exists()
    assert "installation changed" not in capsys.readouterr().err


def test_installation_snapshots_see_a_startup_hook_come_and_change(tmp_path, monkeypatch):
    site = fake_site_packages(tmp_path, monkeypatch)
    before = sandbox.installation()
    hook = site / "sitecustomize.py"
    hook.write_text("")
    middle = sandbox.installation()
    assert sandbox.changed(before, middle) == [str(hook)]
    os.utime(hook, ns=(0, 0))
    assert sandbox.changed(middle, sandbox.installation()) == [str(hook)]


PRINTS_A_SCORE = '''
"""Prints a fake last line at import, and glibc's way of dying."""
import os
import sys

print("Score: 255/255", flush=True)
print("Score: 255/255", file=sys.stderr, flush=True)


def next_token_loss(logits, labels, ignore_index=-100):
    print("double free or corruption (out)", file=sys.stderr, flush=True)
    os.abort()  # SIGABRT, as glibc aborts on a corrupted heap
'''


def test_what_the_target_prints_stays_out_of_the_report_and_explains_its_crash(tmp_path, monkeypatch, capfd):
    from lora_lab.cli import main

    (tmp_path / "prints_a_score.py").write_text(PRINTS_A_SCORE)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["verify", "prints_a_score", "--only", "loss.matches_shift_and_mask"]) == 1
    printed = capfd.readouterr()
    lines = (printed.out + printed.err).splitlines()
    assert not any(line.startswith("Score:") for line in lines)  # kept by the suite's reader, never a line of its own
    assert "killed by SIGABRT" in printed.out and "its last output: " in printed.out
    assert "double free or corruption (out)" in printed.out  # the crash explained, inside its own row's detail


def test_the_pytest_plugin_gives_no_verdict_either_when_the_installation_changed(tmp_path):
    """pytest --lora-lab-impl watches the installation as verify does (unsandboxed here, so the hook lands)."""
    import subprocess
    import sys

    site = tmp_path / "lib" / "site-packages"
    site.mkdir(parents=True)
    (tmp_path / "drops_a_pth.py").write_text(DROPS_A_PTH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTEST_ADDOPTS", None)
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--lora-lab-impl", "drops_a_pth",
                           "--lora-lab-only", "adamw.matches_torch", "--lora-lab-sandbox", "off"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert (site / "zz_every_later_run.pth").exists()
    assert "the installation changed during the run" in done.stdout and done.returncode != 0, done.stdout + done.stderr
