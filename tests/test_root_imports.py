"""Python run from the repository root finds the folder ``kernels/`` first under the name ``kernels``.

That is Hugging Face's package's name, which transformers 5 imports (``from kernels import CUDAProperties``), so
``python -c``, ``python -m``, a REPL or a notebook started here must still get Hugging Face's package under that name,
and ``lora_lab.kernels`` must stay ours. (Main was red on a fresh machine the day transformers 5.25 began to import it.)
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_in_root(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def hugging_face_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not hugging_face_kernels_installed(), reason="Hugging Face's kernels package is not installed")
def test_python_c_in_the_root_imports_peft_transformers_and_hugging_faces_kernels():
    done = run_in_root(
        "-c",
        "import peft, transformers, kernels, lora_lab.kernels as ours; "
        "print(kernels.__file__); print(ours.__file__); print(kernels.CUDAProperties.__name__, ours.qlora_linear.__name__)",
    )
    assert done.returncode == 0, done.stderr
    theirs, ours, names = done.stdout.splitlines()[-3:]
    assert Path(theirs).parent != ROOT / "kernels", "import kernels found lora_lab's folder, not Hugging Face's package"
    assert Path(ours) == ROOT / "kernels" / "__init__.py"
    assert names == "CUDAProperties fused_qlora_linear"


def test_python_m_in_the_root_runs_a_lora_lab_command():
    done = run_in_root("-m", "lora_lab.cli", "size", "--preset", "tiny", "--r", "4")
    assert done.returncode == 0, done.stderr
    assert "LoRA adapters: r=4" in done.stdout


def test_without_hugging_faces_package_import_kernels_says_what_the_folder_is():
    done = run_in_root(
        "-c",
        "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as error:\n"
        "    print(type(error).__name__, error.name, 'kernels' in sys.modules); print(error)",
    )
    assert done.returncode == 0, done.stderr
    first, message = done.stdout.splitlines()
    assert first == "ModuleNotFoundError kernels False"  # nothing half-imported is left behind under that name
    assert "import it as lora_lab.kernels" in message
