"""The house's rules, read from the import graph of `app/` (docs/architecture.md, "Layers"):

- no import circle between modules, and no import inside a function (where one would hide);
- `kit/` and `db/` (with `config`) are the floor: they import no domain;
- no module imports a router other than the composition roots (`main`, `worker`, `cli`),
  and no domain imports another's router;
- domains react to each other's changes through the seam (app/kit/reactions.py): the
  catalog imports none of the domains that react to it.

Imports under `if TYPE_CHECKING:` do not run and are not counted.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"
FLOOR = {"kit", "db", "config"}
ROOTS = {"app.main", "app.worker", "app.cli", "app.wiring"}
# The CLI loads a command's modules when the command runs, so `portolan --help` and the
# light commands start without the server's imports.
LAZY_ALLOWED = {"app.cli"}
# Domains that react to catalog changes: the catalog must not import them.
REACTING = {
    "scorecards",
    "history",
    "automations",
    "webhooks",
    "integrations",
    "actions",
    "dispatch",
    "workflows",
    "pages",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in APP.rglob("*.py"):
        parts = path.relative_to(APP.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(tree: ast.AST, package: str) -> list[tuple[str, bool, int]]:
    """(imported name, inside a function, line) for each import that runs."""
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for branch in child.orelse:
                    visit(branch, in_function)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    up = parts[: len(parts) - child.level + 1]
                    base = ".".join([*up, base] if base else up)
                found.extend((f"{base}.{a.name}", in_function, child.lineno) for a in child.names)
            nested = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, in_function or nested)

    visit(tree, False)
    return found


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Module -> the app modules it imports when it runs; and the imports inside functions."""
    modules = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    inner: list[tuple[str, str, int]] = []

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for target, in_function, line in _imports(ast.parse(path.read_text()), package):
            found = resolve(target) if target.startswith("app") else None
            if found and found != module:
                edges[module].add(found)
                if in_function:
                    inner.append((module, found, line))
    return edges, inner


def _domain(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(set(edges) | {t for ts in edges.values() for t in ts}):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_no_import_runs_in_a_circle() -> None:
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_no_import_hides_inside_a_function() -> None:
    _, inner = _graph()
    hidden = [f"{m} -> {t} (line {line})" for m, t, line in inner if m not in LAZY_ALLOWED]
    assert hidden == []


def test_kit_and_db_import_no_domain() -> None:
    edges, _ = _graph()
    upward = [
        f"{m} -> {t}"
        for m, targets in edges.items()
        if _domain(m) in FLOOR
        for t in targets
        if _domain(t) not in FLOOR
    ]
    assert upward == []


def test_routers_are_imported_only_by_the_composition_roots() -> None:
    edges, _ = _graph()
    wrong = [
        f"{m} -> {t}"
        for m, targets in edges.items()
        if m not in ROOTS
        for t in targets
        if t.endswith("router") and (_domain(m) != _domain(t) or not m.endswith("router"))
    ]
    assert wrong == []


def test_the_catalog_imports_none_of_the_domains_that_react_to_it() -> None:
    """Its services and models, that is: its routers sit above every domain's services
    (the entity read's `?at=` asks history's)."""
    edges, _ = _graph()
    wrong = [
        f"{m} -> {t}"
        for m, targets in edges.items()
        if _domain(m) == "catalog" and not m.endswith("router")
        for t in targets
        if _domain(t) in REACTING
    ]
    assert wrong == []


def test_the_graph_reader_sees_circles_and_hidden_imports(tmp_path: Path) -> None:
    """The checks above can fail: a circle and an import in a function are found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    edges, inner = _graph()
    assert "app.catalog.entities" in edges  # the reader found the app's modules
    assert edges["app.catalog.entities"] & {"app.kit.reactions"}
    assert all(m in LAZY_ALLOWED for m, _, _ in inner)
