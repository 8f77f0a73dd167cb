"""Where a target's code comes from: its source files and their hash, and which operations are lora_lab's own.

A published "24 passed" should be tied to the code it came from, so a report
records the target's module path and the sha256 of its source files, found
from the import system's specs without executing any of the target's code in
the trusted process. And a target or exercise file that only re-exports
lora_lab's reference (``from lora_lab.nf4 import *``) tests lora_lab, not
itself: ``origin_of`` (run in the target's process) says so, and ``grade``
gives such an operation no points.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import inspect
import sys
from pathlib import Path
from typing import Any

LORA_LAB_PACKAGES = ("lora_lab", "lora_lab.kernels")


def _package_dirs() -> list[Path]:
    dirs = []
    for name in LORA_LAB_PACKAGES:
        module = sys.modules.get(name)
        locations = getattr(getattr(module, "__spec__", None), "submodule_search_locations", None) if module else None
        if locations is None:
            spec = find_spec_without_import(name)
            locations = spec.submodule_search_locations if spec is not None else None
        dirs += [Path(p).resolve() for p in locations or ()]
    return dirs


def _code_file(fn: Any) -> str | None:
    while isinstance(fn, functools.partial):
        fn = fn.func
    try:
        fn = inspect.unwrap(fn)
    except ValueError:
        pass
    code = getattr(fn, "__code__", None) or getattr(vars(type(fn)).get("__call__"), "__code__", None)
    if code is None and hasattr(fn, "fn"):  # a triton.jit or similar wrapper object
        return _code_file(fn.fn)
    return code.co_filename if code is not None else None


def origin_of(fn: Any) -> dict:
    """``{"module", "file", "lora_lab"}`` of an operation: is it lora_lab's own reference, re-exported?"""
    file = _code_file(fn)
    module = getattr(fn, "__module__", None) or ""
    in_lora_lab = False
    if file is not None:
        path = Path(file).resolve()
        in_lora_lab = any(path.is_relative_to(d) for d in _package_dirs())
    elif module.split(".")[0] == "lora_lab":
        in_lora_lab = True
    return {"module": module, "file": file, "lora_lab": in_lora_lab}


def find_spec_without_import(name: str, path: list[str] | None = None):
    """The spec of module ``name`` found on ``path`` (default sys.path) without executing any package's __init__.

    Each level is looked up as the import system would, by the finders on ``sys.meta_path`` in their order, but
    without importing the parent: ``PathFinder`` on the parent's folders, then the finders an installation added.
    An editable install of lora_lab adds one, which maps ``lora_lab.kernels`` to the repository's ``kernels/``
    (pyproject's package-dir): with ``PathFinder`` alone that package had no files, so a kernel target's Triton
    was not seen (its interpreted calls were timed) and the installation watch did not cover ``kernels/``.
    """
    locations = path if path is not None else sys.path
    spec = None
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        spec = _find_spec(".".join(parts[:depth]), locations)
        if spec is None:
            return None
        locations = list(spec.submodule_search_locations or [])
    return spec


def _find_spec(fullname: str, locations: list[str]):
    """The first spec the meta path's finders give for ``fullname`` in ``locations``; finders never import."""
    for finder in sys.meta_path:
        if finder in (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter):
            continue  # built-in and frozen modules have no source file of a target
        find = getattr(finder, "find_spec", None)
        spec = find(fullname, locations) if find is not None else None
        if spec is not None:
            return spec
    return None


def source_files(module_name: str, path: list[str] | None = None) -> list[Path]:
    """The target's source files: its module file, or every .py file of its package."""
    spec = find_spec_without_import(module_name, path)
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        return []
    if spec.submodule_search_locations:
        return sorted(p for d in spec.submodule_search_locations for p in Path(d).rglob("*.py"))
    return [Path(spec.origin)]


def sha256_of(files: list[Path]) -> str | None:
    """One sha256 over the files' relative names and bytes, in order; None when there are none."""
    if not files:
        return None
    digest = hashlib.sha256()
    root = files[0].parent if len(files) == 1 else Path(*Path(files[0]).parts[: _common_depth(files)])
    for file in files:
        digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def _common_depth(files: list[Path]) -> int:
    parts = [f.parts for f in files]
    depth = 0
    while all(len(p) > depth + 1 and p[depth] == parts[0][depth] for p in parts):
        depth += 1
    return depth
