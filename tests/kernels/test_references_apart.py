"""The `*_ref.py` torch references are the spec the kernels are tested against: production code never imports them.

If a production path called into a reference, the test "kernel vs reference" would partly compare the reference
with itself. Allowed importers: the references themselves (a spec may build on another spec), the package's
`__init__.py` (it re-exports the specs for users who test their own code against them) and the tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = ("kernels", "rollout", "deepeyesv2", "bench")


def _imported_modules(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            out.append("." * node.level + (node.module or ""))
            out += [f"{node.module or ''}.{a.name}" for a in node.names]  # `from . import logprobs_ref`
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def _ref_imports(path: Path) -> list[str]:
    return [m for m in _imported_modules(path) if m.rsplit(".", 1)[-1].endswith("_ref")]


def test_no_production_module_imports_a_reference():
    offenders = []
    for folder in PRODUCTION:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if path.name.endswith("_ref.py") or rel.as_posix() == "kernels/__init__.py":
                continue
            offenders += [f"{rel}: imports {m}" for m in _ref_imports(path)]
    assert offenders == []


def test_the_check_sees_each_import_form(tmp_path):
    """The scanner itself can fail: every spelling of a reference import is caught."""
    src = tmp_path / "m.py"
    src.write_text(
        "from .grpo_loss_ref import LOSS_AGGS\n"
        "from deepeyesv2_kernels.logprobs_ref import logprobs_ref\n"
        "from . import mrope_ref\n"
        "import deepeyesv2_kernels.advantages_ref as a\n"
        "def f():\n    from .linear_grpo_ref import x\n"
        "from .grpo_terms import LOSS_AGGS\n"
    )
    found = {m.rsplit(".", 1)[-1] for m in _ref_imports(src)}
    assert found == {"grpo_loss_ref", "logprobs_ref", "mrope_ref", "advantages_ref", "linear_grpo_ref"}
