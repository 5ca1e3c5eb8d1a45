"""The project's module-level imports form no cycle, and flow one way between the packages:
experiments -> search -> objectives -> gqa (read statically from the sources)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gqa", "objectives", "search", "experiments")
LAYER = {name: rank for rank, name in enumerate(PACKAGES)}  # may import only lower ranks


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module(path): path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "remote" not in path.parts  # gqa/remote: a copy shipped inside checkpoints
    }


def _top_level_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported at module level (not inside functions or classes)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import submodule` imports the submodule; `from m import name`, m
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [m if m in modules else node.module for m in submodules]
        found |= {name for name in names if name in modules}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _top_level_imports(path, modules) for name, path in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_imports_flow_from_experiments_to_gqa():
    wrong = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if LAYER[target.split(".")[0]] > LAYER[module.split(".")[0]]
    ]
    assert not wrong, wrong
