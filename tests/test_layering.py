"""The package layering: `pretrain/` and `finetune/` build on `common/`, never on each other, and
no module imports itself back through a circle. Every import counts, also those inside functions
(a lazy import is still a dependency); those under ``if TYPE_CHECKING:`` do not run, so they do not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "pretrain", "finetune")
ALLOWED = {"common": {"common"}, "pretrain": {"common", "pretrain"}, "finetune": {"common", "finetune"}}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from a.b import c`` counts a.b.c when that is a module)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                 for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:  # a symbol, not a module: its module is the parent
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    modules = set(files)
    # A package's own __init__ is not an edge worth reporting (importing a.b runs a/__init__).
    return {name: {m for m in _imports(path, modules) if m != name and not name.startswith(m + ".")}
            for name, path in files.items()}


def test_stages_import_only_common_and_themselves() -> None:
    bad = sorted(f"{src} -> {dst}" for src, dsts in _graph().items() for dst in dsts
                 if dst.split(".")[0] not in ALLOWED[src.split(".")[0]])
    assert not bad, "imports against the layering: " + ", ".join(bad)


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", PACKAGES)
def test_the_walk_sees_real_edges(package: str) -> None:
    """Guards the two tests above against passing on an empty graph."""
    graph = _graph()
    assert any(dst.startswith("common") for src, dsts in graph.items() if src.startswith(package) for dst in dsts)
