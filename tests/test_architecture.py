"""The layout docs/ARCHITECTURE.md describes, checked on the import graph: which room may use which, no import
circles, the service on the library's public API only, and no module reached by name at run time."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dgq_core", "dgq_zoo", "dgq_eval", "service")
# Which of our packages each package may import. dgq_core is the library and uses none of them.
ALLOWED = {
    "dgq_core": set(),
    "dgq_zoo": set(),
    "dgq_eval": {"dgq_core", "dgq_zoo"},
    "service": {"dgq_core", "dgq_zoo"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in (REPO / package).rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that `name` imports, anywhere in the file (function-level imports count)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from package import submodule` imports the submodule; `from module import name` the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_packages_import_only_the_rooms_below_them():
    wrong = [
        f"{name} -> {target}"
        for name, targets in _graph().items()
        for target in targets
        if (source := name.split(".")[0]) != (dest := target.split(".")[0]) and dest not in ALLOWED[source]
    ]
    assert not wrong, wrong


def test_no_import_circles():
    graph = _graph()
    index, low, on_stack, stack, circles = {}, {}, set(), [], []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, circles


def test_the_service_uses_the_library_through_its_public_api_only():
    deep = sorted(
        f"{name} -> {target}"
        for name, targets in _graph().items()
        if name.startswith("service")
        for target in targets
        if target.startswith("dgq_core.")
    )
    assert not deep, deep


def test_no_module_is_reached_by_name_at_run_time():
    by_name = [
        str(path.relative_to(REPO))
        for path in _modules().values()
        if "import_module(" in path.read_text() or "__import__(" in path.read_text()
    ]
    assert not by_name, by_name
