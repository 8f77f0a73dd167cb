"""Every Python snippet in the README runs as written (a new user pastes them into a file or a REPL)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = re.findall(r"```python\n(.+?)\n```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_its_python_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_a_readme_python_snippet_runs_as_written(snippet, tmp_path):
    done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the README snippet failed:\n{snippet}\n{done.stderr[-3000:]}"
