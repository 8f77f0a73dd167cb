"""Whose code is graded: decided from the learner's source, in the suite's process, before any of it runs.

The learner's process reports where each function comes from, but a one-line wrapper around lora_lab's reference
is the learner's own function object, and the learner's process is the learner's to tamper with. So the grader
reads the file itself and gives no points when it:

- imports from lora_lab anything its exercise stub does not (the stub's own imports are the allowed set:
  ``STUB_IMPORTS``), or imports lora_lab by a name built at run time;
- runs code it builds at run time (``exec``, ``eval``, ``compile``, ``__import__``, ``importlib``, ``runpy``): the
  grader must be able to read what it grades;
- calls, at the top level of the function the exercise asks for, a reference function its stub lends for one part
  only (``LENT_FOR_A_PART``: exercise 01's stub lends the reference's ``quantize_nf4`` for double quantization);
- has a function whose code is, name aside, a function of lora_lab's (copied text);
- is a Triton exercise (07, 08) that defines or launches no ``@triton.jit`` kernel.

A determined copier can still hide reference code from a reader (renaming every variable, say): this raises the
cost of the obvious ways, it does not prove authorship.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import lora_lab
from lora_lab.conformance.isolation.origin import source_files

# What each stub imports from lora_lab, by module: a learner's file may import these and nothing else of lora_lab.
STUB_IMPORTS = {
    "ex01_nf4": {"lora_lab.nf4": {"NF4_CODE", "NF4Tensor", "quantize_nf4"}},
    "ex02_double_quant": {"lora_lab.nf4": {"NF4Tensor", "dynamic_map", "quantize_nf4"}},
    "ex03_qlora_linear": {"lora_lab.nf4": {"NF4Tensor", "dequantize_nf4"}},
    "ex04_loss": {},
    "ex05_adamw": {},
    "ex06_training_step": {"lora_lab.model": {"tiny_llama"}, "lora_lab.data": {"generate_products", "collate"},
                           "lora_lab.lora": {"NF4Linear", "QLoRALinear"}, "lora_lab.loss": {"next_token_loss"}},
    "ex07_triton_dequant": {"lora_lab.nf4": {"NF4_CODE", "NF4Tensor"}},
    "ex08_triton_forward": {"lora_lab.nf4": {"NF4_CODE", "NF4Tensor"}},
}
# Reference functions a stub lends for one part of the function of the same name (exercise 02 lends single
# quantization to build on, so there delegating is the design).
LENT_FOR_A_PART = {"ex01_nf4": {"quantize_nf4"}}
TRITON_EXERCISES = ("ex07_triton_dequant", "ex08_triton_forward")
RUNTIME_CODE = {"exec", "eval", "compile", "__import__"}
RUNTIME_MODULES = {"importlib", "runpy"}
TEXTBOOK = ("nf4", "lora", "operands", "model", "data", "loss", "optim", "train")


def not_the_learners(stem: str, source: str) -> str | None:
    """Why the file's points are not the learner's (one line), or None. ``stem`` names its exercise."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None  # the learner's process reports it, with the line, as the file not importing
    allowed = STUB_IMPORTS.get(stem, {})
    lent: dict[str, str] = {}  # local name -> lora_lab function it stands for
    graded = ast.Module(body=[node for node in tree.body if not _is_main_block(node)], type_ignores=[])
    for node in ast.walk(graded):  # what runs when the grader loads the file: not its `if __name__ == "__main__":`
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lora_lab" or alias.name.split(".")[0] in RUNTIME_MODULES:
                    return f"it imports {alias.name}; {stem}.py may import from lora_lab only what its stub imports"
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            if root in RUNTIME_MODULES:
                return f"it imports from {node.module}, which runs code chosen at run time; the grader grades code it can read"
            if root != "lora_lab":
                continue
            for alias in node.names:
                if alias.name not in allowed.get(node.module, set()):
                    return (f"it imports {alias.name} from {node.module}, lora_lab's own code; {stem}.py may import only "
                            f"what its stub imports ({_allowed_text(allowed)})")
                lent[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in RUNTIME_CODE:
            return f"it calls {node.func.id}(), which runs code built at run time; the grader grades code it can read"
    functions = [node for node in ast.walk(graded) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for function in functions:
        if function.name in LENT_FOR_A_PART.get(stem, ()) and (name := _only_delegates(function, lent)):
            return (f"{function.name} hands its work to lora_lab's {lent[name]} (as {name}); the stub lends it for "
                    "one part only, and these points are for your own implementation")
    copies = _reference_bodies()
    for function in functions:
        if (origin := copies.get(_shape(function))) is not None:
            return f"{function.name} is lora_lab's {origin}, copied; these points are for your own implementation"
    if stem in TRITON_EXERCISES and not _launches_a_kernel(graded, functions) and not _still_a_stub(functions):
        return ("it defines or launches no @triton.jit kernel; this exercise's points are for a Triton kernel "
                "(the torch version of the op is an earlier exercise)")
    return None


def _is_main_block(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":``: a file's own command line (``python exercises/ex04_loss.py`` grades it)."""
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) \
        and test.left.id == "__name__"


def _allowed_text(allowed: dict[str, set[str]]) -> str:
    return "; ".join(f"{module}: {', '.join(sorted(names))}" for module, names in sorted(allowed.items())) or "nothing"


def _only_delegates(function: ast.FunctionDef, lent: dict[str, str]) -> str | None:
    """The lent name a taught function's body calls unconditionally, at its top level, or None."""
    for statement in function.body:
        for node in ast.walk(statement) if isinstance(statement, (ast.Return, ast.Assign, ast.Expr)) else ():
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in lent \
                    and lent[node.func.id] == function.name:
                return node.func.id
    return None


def _shape(function: ast.FunctionDef) -> str:
    """A function's code without its name and docstring, as the parser sees it (formatting and comments aside)."""
    body = function.body[1:] if function.body and isinstance(function.body[0], ast.Expr) \
        and isinstance(function.body[0].value, ast.Constant) and isinstance(function.body[0].value.value, str) \
        else function.body
    return ast.dump(ast.Module(body=body, type_ignores=[])) + ast.dump(function.args)


@functools.lru_cache(maxsize=1)
def _reference_bodies() -> dict[str, str]:
    """Every function of lora_lab's textbook and kernels with a body of more than two statements, by shape."""
    package = Path(lora_lab.__file__).parent
    files = [package / f"{name}.py" for name in TEXTBOOK] + source_files("lora_lab.kernels")
    found = {}
    for path in files:
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(node.body) > 2:
                found[_shape(node)] = f"{path.stem}.{node.name}"
    return found


def _still_a_stub(functions: list[ast.FunctionDef]) -> bool:
    """A function that still raises NotImplementedError: the checks report it as not attempted."""
    return any(isinstance(node, ast.Raise) and "NotImplementedError" in ast.dump(node) for f in functions
               for node in ast.walk(f))


def _launches_a_kernel(tree: ast.Module, functions: list[ast.FunctionDef]) -> bool:
    """A function decorated with triton.jit, and a ``kernel[grid](...)`` launch of one such function."""
    kernels = {f.name for f in functions if any(_is_triton_jit(d) for d in f.decorator_list)}
    return bool(kernels) and any(
        isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and isinstance(node.func.value, ast.Name)
        and node.func.value.id in kernels for node in ast.walk(tree))


def _is_triton_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(target, ast.Attribute) and target.attr in ("jit", "autotune", "heuristics")) or (
        isinstance(target, ast.Name) and target.id == "jit")
