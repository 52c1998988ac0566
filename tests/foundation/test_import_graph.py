"""The trainer package's import graph is acyclic, and imports inside functions are kept for what must be lazy.

Read from the source with `ast` (nothing is imported): every `import` / `from ... import` of a `deepeyesv2`
module at module level is an edge; a cycle among them fails the test with the cycle spelled out. Imports
inside a function body are allowed only for
  - optional or heavy third-party packages (LAZY below: GPU-only packages, optional extras, and packages whose
    import takes seconds and which only some commands need), and
  - the CLI dispatcher choosing one command's module (`deepeyesv2/commands/cli.py`), so that `deepeyesv2 --help`
    and one command do not import every other command.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "deepeyesv2"

# top-level package name -> why it is imported lazily
LAZY = {
    "flash_attn": "GPU-only ([gpu] extra)",
    "xformers": "GPU-only ([gpu] extra)",
    "sglang": "GPU engine ([gpu] extra)",
    "peft": "LoRA only ([dev]/[bench] extras)",
    "matplotlib": "plots only; slow import",
    "tensorboard": "optional logger",
    "wandb": "optional logger",
    "transformers": "model building only; a 2 s import that `plan`, `plot` and `--help` do not need",
    "torch": "torch.distributed.* (torchrun only) and torch.utils.tensorboard (optional logger) submodules",
    "trl": "optional peer",
    "liger_kernel": "optional peer",
}
DISPATCHER = PKG / "commands" / "cli.py"
# file -> {package: why it is lazy there only}
LAZY_IN = {
    "deepeyesv2/commands/bench.py": {"torch": "bench/_common.py imports this module's table helpers into light "
                                              "parent processes that must import only the standard library"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(node: ast.ImportFrom, mod: str, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(path: Path):
    """(module-level targets, [(lineno, target) of imports inside functions])."""
    mod = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    top, inner = [], []

    def targets(node, in_func):
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = resolve(node, mod, path.name == "__init__.py")
        # `from pkg import sub` may name a submodule: the graph counts both
        return [base] if in_func else [base] + [f"{base}.{a.name}" for a in node.names]

    def walk(node, in_func):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for t in targets(child, in_func):
                    (inner if in_func else top).append((child.lineno, t))
            walk(child, in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    walk(tree, False)
    return top, inner


def files():
    return sorted(PKG.rglob("*.py"))


def test_trainer_import_graph_is_acyclic():
    mods = {module_name(p): p for p in files()}
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        top, _ = imports(p)
        for _, t in top:
            if t in mods and t != m:
                graph[m].add(t)
    assert len(graph) > 20, "the walk found too few modules: is PKG right?"
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_function_level_imports_are_only_lazy_dependencies():
    bad = []
    for p in files():
        _, inner = imports(p)
        for line, t in inner:
            top = t.split(".")[0]
            if top == "deepeyesv2" and p == DISPATCHER:
                continue
            if top in LAZY and (top != "torch" or t.startswith(("torch.distributed", "torch.utils.tensorboard"))):
                continue
            if top in LAZY_IN.get(str(p.relative_to(ROOT)), {}):
                continue
            bad.append(f"{p.relative_to(ROOT)}:{line}: import {t}")
    assert not bad, "imports inside functions that should be at module level:\n" + "\n".join(sorted(set(bad)))


def test_the_check_can_fail(tmp_path):
    """The cycle detector and the lazy-import rule catch a planted cycle and a planted function-level import."""
    p = tmp_path / "x.py"
    p.write_text("import os\ndef f():\n    import json\n    from deepeyesv2 import config\n")
    global ROOT
    old = ROOT
    ROOT = tmp_path
    try:
        top, inner = imports(p)
    finally:
        ROOT = old
    assert [t for _, t in top] == ["os"]
    assert {t for _, t in inner} == {"json", "deepeyesv2"}
