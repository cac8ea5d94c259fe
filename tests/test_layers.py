"""The house rules of imports (DESIGN.md: data moves one way; STYLE.md B).

Read from the source with ``ast``, so every import counts, ``TYPE_CHECKING`` ones too:
policy (which decides) never imports deliver (which acts), and no two modules import
each other, directly or round a longer circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mta

PACKAGE = Path(mta.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def test_policy_never_imports_deliver() -> None:
    graph = _imports()
    offenders = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith("mta.policy")
        for target in targets
        if target.startswith("mta.deliver")
    }
    assert offenders == set()


def test_no_import_cycles() -> None:
    graph = _imports()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
