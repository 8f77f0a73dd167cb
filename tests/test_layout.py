"""The layout rules of README's "Layout" table, checked on the source rather than trusted.

- The import graph of ``lora_lab`` has no cycle, lazy imports inside functions included (an
  ``if __name__ == "__main__":`` block is a script's, not the module's, and is left out).
- The textbook (the modules at the top of ``lora_lab/``) imports only the textbook: it is what
  every part builds on, so it can build on no part. The one exception is the QLoRA layer's
  ``backend="triton"``, which reaches ``lora_lab.kernels`` lazily.
- ``lora_lab.kernels`` imports only ``nf4``, the shared operand rules and itself (DESIGN.md).
- Each kernel file in ``kernels/`` ends as Triton's tutorials do: a ``__main__`` block that checks the kernel
  against the torch reference and has a ``perf_report``; compile-only tooling sits in ``kernels/compile/``.
- The conformance suite's rooms import only from the rooms below them (``lora_lab/conformance/__init__.py``):
  registry and errors, judge, isolation, properties, the runner, the front ends.
- No module is over about 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTBOOK = {f"lora_lab.{name}" for name in ("nf4", "lora", "operands", "model", "data", "loss", "optim", "train")} | {"lora_lab"}
MAX_LINES = 400
KERNEL_HELPERS = {"__init__.py", "common.py", "tiles.py", "small_m_grid.py"}  # helpers of the kernel files, not kernels


def _module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[0] == "kernels":  # kernels/ is installed as lora_lab.kernels
        parts = ["lora_lab", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    files = [*(ROOT / "lora_lab").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]
    return {_module_name(path): path for path in files}


def _is_main_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
    )


def _imported(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The lora_lab modules a module imports anywhere in its body, but for its __main__ block."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_main_block(node):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            found.update(name for name in candidates if name in modules)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(ast.parse(path.read_text()), modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_textbook_imports_only_the_textbook():
    allowed_extra = {"lora_lab.lora": {"lora_lab.kernels"}}  # backend="triton", imported lazily
    for name, targets in _graph().items():
        if name in TEXTBOOK:
            allowed = allowed_extra.get(name, set())
            outside = {t for t in targets if t not in TEXTBOOK and not any(t.startswith(a) for a in allowed)}
            assert not outside, f"textbook module {name} imports {sorted(outside)}; the textbook builds on no part"


def test_the_kernels_import_only_nf4_and_the_operand_rules():
    for name, targets in _graph().items():
        if name.startswith("lora_lab.kernels"):
            outside = {t for t in targets if not t.startswith("lora_lab.kernels")} - {"lora_lab.nf4", "lora_lab.operands"}
            assert not outside, f"{name} imports {sorted(outside)}; lora_lab.kernels imports only nf4 and operands"


CONFORMANCE = "lora_lab.conformance"
ROOMS = (  # bottom first: a module may import from its own room and the rooms before it
    ("registry and errors", ("registry", "errors")),
    ("judge", ("judge",)),
    ("isolation", ("isolation",)),
    ("properties", ("properties",)),
    ("runner", ("runner",)),
    ("front ends", ("verify", "plugin", "matrix", "grading")),
)


def _room(module: str) -> int | None:
    """The index in ROOMS of a conformance module's room; None outside the suite or for the package itself."""
    if not module.startswith(CONFORMANCE + "."):
        return None
    first = module.removeprefix(CONFORMANCE + ".").split(".")[0]
    return next(i for i, (_, names) in enumerate(ROOMS) if first in names)


def _upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{module} ({ROOMS[_room(module)][0]}) imports {target} ({ROOMS[_room(target)][0]})"
            for module, targets in sorted(graph.items()) if _room(module) is not None
            for target in sorted(targets) if _room(target) is not None and _room(target) > _room(module)]


def test_every_conformance_module_lives_in_a_room():
    for name in _modules():
        if name.startswith(CONFORMANCE + "."):
            assert _room(name) is not None, f"{name} is in none of the suite's rooms: {[room for room, _ in ROOMS]}"


def test_no_import_in_the_conformance_suite_runs_back_up():
    upward = _upward_imports(_graph())
    assert not upward, "imports that run from a lower room of the suite to a higher one:\n" + "\n".join(upward)


def test_the_room_check_finds_an_upward_import():
    """Test the test: the judge reaching into isolation is found, the reverse is not."""
    graph = {f"{CONFORMANCE}.judge.memory": {f"{CONFORMANCE}.isolation.wire", f"{CONFORMANCE}.registry"},
             f"{CONFORMANCE}.isolation.wire": {f"{CONFORMANCE}.judge.memory"}}
    assert _upward_imports(graph) == [f"{CONFORMANCE}.judge.memory (judge) imports {CONFORMANCE}.isolation.wire (isolation)"]
def test_each_kernel_file_ends_with_its_check_and_perf_report():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        if path.name in KERNEL_HELPERS:
            continue
        last = ast.parse(path.read_text()).body[-1]
        assert _is_main_block(last), f"kernels/{path.name} does not end with an if __name__ == '__main__': block"
        block = ast.unparse(last)
        assert "from lora_lab.lora import" in block or "from lora_lab.nf4 import" in block, (
            f"kernels/{path.name}'s __main__ block does not check the kernel against lora_lab's torch reference")
        assert "perf_report" in block, f"kernels/{path.name}'s __main__ block has no triton.testing.perf_report"


def test_no_module_is_over_400_lines():
    lines = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    too_long = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by idea): {too_long}"



def test_the_cycle_finder_finds_a_lazy_cycle_and_accepts_a_diamond():
    """Test the test: a cycle hidden in a function-level import is found; a diamond is not a cycle."""
    modules = {"pkg.a": Path("a.py"), "pkg.b": Path("b.py"), "pkg.c": Path("c.py")}
    lazy_back_edge = ast.parse("import pkg.b\n\ndef f():\n    from pkg.a import x\n")
    assert _imported(lazy_back_edge, modules) == {"pkg.a", "pkg.b"}
    assert _cycle({"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert _cycle({"pkg.a": {"pkg.b", "pkg.c"}, "pkg.b": {"pkg.c"}, "pkg.c": set()}) is None
    main_only = ast.parse('if __name__ == "__main__":\n    import pkg.a\n')
    assert _imported(main_only, modules) == set()
