"""The package's layers import downward only, and no module imports itself back through others.

Read from the source with ``ast`` (every ``import``, function-level ones included), so a lazy
import inside a function counts like a top-level one: it is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import imagegen

PACKAGE = Path(imagegen.__file__).parent

#: layer -> layers it must never import
FORBIDDEN = {
    "faces": {"pipelines", "identity", "serve", "eval", "demo"},
    "pipelines": {"identity", "serve", "eval", "demo"},
    # the tiny stand-in writer builds identity modules' weights: it sits above identity; the asset
    # store reaches it by name (``imagegen.standins.build:write_standins``), not by an import
    "standins": {"serve", "eval", "demo"},
    "identity": {"serve", "eval", "demo"},
    "serve": {"demo"},
    "eval": {"demo"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every ``imagegen`` module ``path`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("imagegen")}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_layers_import_downward_only():
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if layer(target) in FORBIDDEN.get(layer(module), set())
    )
    assert not wrong, "layer violations:\n" + "\n".join(wrong)


def test_no_import_cycles():
    """Tarjan's strongly connected components of the module graph: every component is one module.

    A package's ``__init__`` importing its own submodules is not a cycle (Python imports the
    package first by definition); only edges written in the source count.
    """
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
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
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)
