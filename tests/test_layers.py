"""Imports run one way: the CLI (launch/) and the benches on top, the stages in the middle, base/
at the bottom. Read from the source with ast (every import, module-level or inside a function),
so a lazy import cannot hide a wrong direction."""

from __future__ import annotations

import ast

import pytest

from conftest import REPO

TOP = {"launch", "bench"}
STAGES = {"data_pipeline", "trainer", "search", "serving", "cluster"}
BASE = {"base"}
OURS = TOP | STAGES | BASE


def imports(package: str) -> dict[str, set[str]]:
    """module path -> our top-level packages it imports."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            found |= {n.split(".")[0] for n in names} & OURS
        out[str(path.relative_to(REPO))] = found - {package}
    return out


@pytest.mark.parametrize("package, allowed", [
    *[(p, set()) for p in BASE],
    *[(p, BASE | STAGES) for p in sorted(STAGES) if p != "serving"],
    ("serving", BASE),                                   # a server needs none of the training stack
])
def test_imports_run_one_way(package, allowed):
    wrong = {m: sorted(found - allowed) for m, found in imports(package).items() if found - allowed}
    assert not wrong, wrong


def test_the_graph_is_read_at_all():
    """The checker sees real imports (guards against it silently finding nothing)."""
    assert "base" in imports("trainer")["trainer/train.py"] and "data_pipeline" in imports("trainer")["trainer/train.py"]
    assert {"trainer", "data_pipeline", "base"} <= set().union(*imports("launch").values())
