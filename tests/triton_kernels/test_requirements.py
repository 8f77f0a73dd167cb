"""The install keeps the user's torch: the triton requirement admits what CUDA torch wheels pin.

A CUDA torch wheel pins one Triton (torch 2.11.0 requires ``triton==3.6.0``,
read from its metadata on PyPI). If lora-lab required a newer one, pip would
either fail offline or replace the user's torch to satisfy it. The one thing
that needs a newer Triton, the CPU interpreter under numpy >= 2.4, is refused at
run time with what to install (``common.check_interpreter_numpy``).
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import sys

import lora_lab.kernels as kernels
import pytest
import triton
from lora_lab.kernels import common
from packaging.requirements import Requirement

PYPROJECT = pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml"
# What CUDA torch wheels require of Triton on Linux: torch 2.11.0 -> triton==3.6.0 (its published metadata);
# torch 2.10 -> 3.5/3.6, as issue 17 states for the versions we support.
PINNED_BY_TORCH = {"2.10.0": ("3.5.0", "3.5.1", "3.6.0"), "2.11.0": ("3.6.0",)}


def project_requirements() -> list[Requirement]:
    """The ``dependencies`` of pyproject.toml, as pip reads them."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    return [Requirement(text) for text in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]]


def requirement(name: str, requirements: list[Requirement]) -> Requirement:
    found = [r for r in requirements if r.name == name]
    assert len(found) == 1, f"expected one {name} requirement, got {found}"
    return found[0]


@pytest.mark.parametrize("torch_version", sorted(PINNED_BY_TORCH))
def test_requirements_admit_the_triton_cuda_torch_pins(torch_version):
    """torch 2.10/2.11 and each Triton they pin satisfy pyproject.toml on Linux, so pip changes neither."""
    requirements = project_requirements()
    torch_requirement, triton_requirement = requirement("torch", requirements), requirement("triton", requirements)
    assert torch_requirement.specifier.contains(torch_version), f"{torch_requirement} refuses torch {torch_version}"
    assert triton_requirement.marker is None or triton_requirement.marker.evaluate({"platform_system": "Linux"})
    for pinned in PINNED_BY_TORCH[torch_version]:
        assert triton_requirement.specifier.contains(pinned), (
            f"{triton_requirement} refuses triton {pinned}, which torch {torch_version} pins: pip would replace the torch"
        )


def test_installed_metadata_says_the_same():
    """The installed lora-lab's metadata (what pip resolves against) carries the same triton requirement."""
    try:
        installed = [Requirement(text) for text in importlib.metadata.requires("lora-lab") or []]
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("lora-lab is not installed (pip install -e .)")
    installed_triton = requirement("triton", [r for r in installed if r.marker is None or "extra" not in str(r.marker)])
    assert installed_triton.specifier == requirement("triton", project_requirements()).specifier, (
        "the installed metadata is stale: pip install -e . again"
    )
    assert installed_triton.specifier.contains(triton.__version__), f"the installed triton {triton.__version__} is refused"


def test_interpreter_with_an_old_triton_and_numpy_2_4_is_refused_clearly(monkeypatch):
    """Triton < 3.8's interpreter fails inside a kernel with numpy >= 2.4: the launcher says what to install instead."""
    import numpy

    check = common.check_interpreter_numpy.__wrapped__
    monkeypatch.setattr(common, "INTERPRETING", True)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    with pytest.raises(ImportError, match=r"numpy<2\.4.*triton>=3\.8"):
        check()
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    check()  # numpy 2.3 only warns: Triton 3.6's interpreter runs
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    monkeypatch.setattr(triton, "__version__", "3.8.0")
    check()
    monkeypatch.setattr(common, "INTERPRETING", False)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    check()  # compiled kernels do not use numpy


def test_fused_kernels_refuse_before_running(monkeypatch):
    """The launcher refuses before a kernel runs (the kernel's own error would be a bare TypeError from numpy)."""
    import numpy
    import torch

    from lora_lab.nf4 import quantize_nf4

    monkeypatch.setattr(common, "INTERPRETING", True)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    common.check_interpreter_numpy.cache_clear()
    try:
        with pytest.raises(ImportError, match="numpy<2.4"):
            kernels.fused_qlora_linear(torch.randn(2, 64), quantize_nf4(torch.randn(8, 64), 64), torch.randn(2, 64),
                                       torch.randn(8, 2), 2.0)
    finally:
        common.check_interpreter_numpy.cache_clear()
