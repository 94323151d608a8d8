"""The architecture, checked from the import graph: the wings stay in layer order and no
import circle comes back (imports inside functions count: they hide circles)."""

from __future__ import annotations

import ast
from pathlib import Path

import orxaq_autonomy

PACKAGE = Path(orxaq_autonomy.__file__).parent

# Lowest first. A module may import its own layer and the layers below it, never above.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("errors", "patterns", "secretrules", "secretscan", "envelope", "config")),
    ("store", ("store",)),
    ("dispatch", ("dispatch", "handlers")),
    ("ledger", ("ledger",)),
    ("exchange", ("exchange",)),
    ("mesh", ("mesh",)),
    ("gateway", ("gateway",)),
    ("entry", ("cli", "__main__", "__init__")),
)


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for rank, (_, members) in enumerate(LAYERS):
        if top in members:
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that `module` imports, anywhere in the file."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                prefix = ".".join([*base, *([node.module] if node.module else [])])
            elif (node.module or "").startswith("orxaq_autonomy"):
                prefix = (node.module or "").removeprefix("orxaq_autonomy").lstrip(".")
            else:
                continue
            names = [prefix] + [f"{prefix}.{a.name}".lstrip(".") for a in node.names]
        elif isinstance(node, ast.Import):
            names = [
                a.name.removeprefix("orxaq_autonomy.")
                for a in node.names
                if a.name.startswith("orxaq_autonomy.")
            ]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules) - {"__init__"}
    return {m: _imports(m, p, known) for m, p in modules.items()}


def test_every_import_points_down_the_layers() -> None:
    wrong = [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {dep} ({LAYERS[_layer(dep)][0]})"
        for module, deps in _graph().items()
        for dep in deps
        if _layer(dep) > _layer(module)
    ]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circle() -> None:
    graph = _graph()
    # a package's __init__ may name its own modules; that is not a circle
    for module in graph:
        graph[module] = {d for d in graph[module] if not module.startswith(d + ".")}

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    circles = sorted(m for m in graph if m in reach(m) and m != "__init__")
    assert not circles, f"modules in an import circle: {circles}"


def test_git_is_known_only_to_the_ledger_wing() -> None:
    users = [
        m
        for m, p in _modules().items()
        if not m.startswith("ledger")
        and any(
            isinstance(n, (ast.Import, ast.ImportFrom))
            and any(
                (getattr(n, "module", None) or "").split(".")[0] == "git"
                or a.name.split(".")[0] == "git"
                for a in n.names
            )
            for n in ast.walk(ast.parse(p.read_text()))
        )
    ]
    assert users == []
