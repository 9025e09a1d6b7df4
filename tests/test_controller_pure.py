"""The controller's core modules stay pure (sans-IO): none imports asyncio, zmq, socket, time,
random or os, so the simulator drives them on a virtual clock exactly as the runtime does."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = ["core", "ops", "applytrack", "membership", "placement", "ha", "hints", "api", "maintenance",
        "balance", "inventory", "profiles"]
IMPURE = {"asyncio", "zmq", "socket", "time", "random", "os", "threading", "uvloop"}
ROOT = Path(__file__).resolve().parent.parent


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", CORE)
def test_a_core_module_imports_no_io_clock_or_randomness(module):
    assert not imported(ROOT / "controller" / f"{module}.py") & IMPURE


def test_every_controller_file_is_small_or_says_why_not():
    for path in sorted((ROOT / "controller").glob("*.py")):
        text = path.read_text()
        lines = text.count("\n")
        assert lines <= 500 or "stays whole" in (ast.get_docstring(ast.parse(text)) or ""), (path.name, lines)
