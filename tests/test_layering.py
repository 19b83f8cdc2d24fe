"""The layering README and docs/CONTRACTS.md promise, checked on the source (ast, so a
function-local import counts as much as one at the top):

- ``m2diff/`` is the core: it imports neither ``client`` nor ``server``, nor Flower;
- ``client/`` (the hospital) and ``server/`` (the coordinator) never import each other:
  what both need lives in ``m2diff/`` (``m2diff.ops``, ``m2diff.wire``, ``m2diff.fedutil``);
- no import cycle among the project's modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("m2diff", "client", "server")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import statement of ``path`` names, wherever it stands;
    ``from a import b`` names both ``a`` and ``a.b``."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (the deepest one each import names)."""
    modules = project_modules()
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(path, name):
            parts = imported.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in modules:
                    if candidate != name:
                        targets.add(candidate)
                    break
        edges[name] = targets
    return edges


def test_the_core_imports_neither_the_apps_nor_flower():
    bad = []
    for name, path in project_modules().items():
        if name.split(".")[0] != "m2diff":
            continue
        for imported in imported_names(path, name):
            if imported.split(".")[0] in ("client", "server", "flwr"):
                bad.append(f"{name} imports {imported}")
    assert not bad, bad


def test_client_and_server_do_not_import_each_other():
    bad = []
    for name, path in project_modules().items():
        top = name.split(".")[0]
        other = {"client": "server", "server": "client"}.get(top)
        for imported in imported_names(path, name) if other else ():
            if imported.split(".")[0] == other:
                bad.append(f"{name} imports {imported}")
    assert not bad, bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_checker_sees_local_imports_and_cycles():
    """The checks above would pass on a parser that saw nothing: they do see."""
    edges = graph()
    assert "m2diff.config" in edges["m2diff.cli"]
    assert "m2diff.ops.procs" in edges["m2diff.simulate"]  # imported inside a function
    assert "client.app_pinning" in edges["client.cli"]  # a relative-free from-import
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
