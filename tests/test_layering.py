"""Imports go one way: data_builders/ below rewards/ below align/ (type-only imports under TYPE_CHECKING aside)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEVEL = {"data_builders": 0, "rewards": 1, "align": 2}


def _runtime_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import that runs, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def layering_violations(root: Path) -> list[str]:
    out = []
    for package, level in LEVEL.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, top in _runtime_imports(path):
                if LEVEL.get(top, -1) > level:
                    out.append(f"{path.relative_to(root)}:{line} imports {top}")
    return out


def test_no_lower_package_imports_a_higher_one():
    assert layering_violations(ROOT) == []


def test_the_check_sees_a_violation(tmp_path):
    for package in LEVEL:
        (tmp_path / package).mkdir()
    (tmp_path / "rewards" / "bad.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from align.config import X\n\n"
                                                 "def f():\n    from align.engine import core\n")
    (tmp_path / "data_builders" / "ok.py").write_text("import torch\nfrom data_builders import samples\n")
    assert layering_violations(tmp_path) == ["rewards/bad.py:6 imports align"]


@pytest.mark.parametrize("package", ["data_builders", "rewards"])
def test_importing_a_lower_package_loads_nothing_above_it(package):
    modules = sorted(p.stem for p in (ROOT / package).glob("*.py") if p.stem != "__init__")
    code = (f"import sys\nfor m in {modules!r}:\n    __import__('{package}.' + m)\n"
            f"above = sorted(k for k in sys.modules if k.split('.')[0] in {[p for p, lv in LEVEL.items() if lv > LEVEL[package]]!r})\n"
            "print(above)\nassert not above, above\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
