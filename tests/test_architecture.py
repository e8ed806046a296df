"""The layout rules of docs/architecture.md, checked on the source tree itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "extensions").rglob("*.py"))
MAX_FUNCTION_LINES = 60


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function without its docstring (decorators and signature included)."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        docstring = body[0].end_lineno - body[0].lineno + 1
    else:
        docstring = 0
    return node.end_lineno - node.lineno + 1 - docstring


def test_the_product_tree_is_found():
    assert len(PRODUCT) > 20  # the checks below must be able to fail


@pytest.mark.parametrize("path", PRODUCT, ids=lambda p: str(p.relative_to(ROOT)))
def test_functions_are_short(path):
    tree = ast.parse(path.read_text())
    long = [
        f"{node.name} ({_body_lines(node)} lines, line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and _body_lines(node) > MAX_FUNCTION_LINES
    ]
    assert not long, f"longer than {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("path", PRODUCT, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_product_stands_on_its_own(path):
    # the repository's CI passes ../shared as a data folder; the product never names it
    assert not re.search(r"\.\./shared|[\"']shared[\"']|shared/", path.read_text()), \
        f"{path} points at the shared folder"


@pytest.mark.parametrize("path", sorted((ROOT / "extensions").rglob("*.py")),
                         ids=lambda p: p.name)
def test_extensions_do_not_import_the_engines(path):
    # per-layer maths is a lower layer than the engines that use it
    tree = ast.parse(path.read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 0]
    offending = [name for name in imported
                 if name.startswith(("msvag_mb.engines", "msvag_mb.gradient_variance",
                                     "msvag_mb.optimizers", "msvag_mb.runner"))]
    assert not offending, f"{path.name} imports {offending}"
