"""Size limits of the product code (docs/ARCHITECTURE.md: small modules that say what they hold; well-kept
ASGI projects keep modules under ~350 lines).

A module that outgrows them usually mixes concerns; split it where the concerns part rather than raise
the limit. Tests and benchmarks are exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "app"
MAX_MODULE_LINES = 360
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(APP.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(APP.parent)))
def test_module_stays_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines"


def test_no_function_is_longer_than_the_limit() -> None:
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(APP.parent)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "\n".join(long)
