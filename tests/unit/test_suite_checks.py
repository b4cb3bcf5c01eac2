"""Checks on the test suite itself: every test asserts an outcome."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_asserts_an_outcome():
    """A test with no assert, no pytest.raises and no pytest.fail passes whatever the code does."""
    silent = []
    for path in sorted(TESTS.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_"):
                src = ast.unparse(node)
                if not any(word in src for word in ("assert", "raises(", "fail(")):
                    silent.append(f"{path.relative_to(TESTS)}::{node.name}")
    assert not silent, f"tests that check nothing: {silent}"
