"""The shape of hfprune/, read from its own source with `ast`: no import cycle between its modules (module-level and
function-level imports alike: a lazy import still makes one layer lean on another), and no module over
MAX_LINES lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hfprune"
MAX_LINES = 400


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {_module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The hfprune module an imported name lives in: `hfprune.a.b` itself, else its longest known prefix (a name
    imported from a package or module)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the hfprune modules it imports}, every `import` / `from ... import` anywhere in its source
    (TYPE_CHECKING blocks included: they name a dependency too)."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, `level - 1` packages up
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                # `from pkg import sub` imports the submodule `pkg.sub` where there is one, else names of `pkg`
                targets = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            deps.update(dep for dep in (_resolve(t, modules) for t in targets) if dep is not None and dep != mod)
        graph[mod] = deps
    return graph


def _package_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ importing its own submodules is how a package is built, not a cycle."""
    return {mod: {d for d in deps if not d.startswith(mod + ".")} for mod, deps in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_the_checker_sees_cycles_and_lazy_imports(tmp_path):
    """The graph reader on a small package of its own: a function-level import closes a cycle, a package's
    __init__ importing its submodules does not."""
    pkg = tmp_path / "hfprune"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from hfprune.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from hfprune import a\n")
    (pkg / "c.py").write_text("from .sub.d import g\n")
    (pkg / "sub" / "__init__.py").write_text("from hfprune.sub.d import g\n")
    (pkg / "sub" / "d.py").write_text("import hfprune.errors\n")
    (pkg / "e.py").write_text("from hfprune import a, c\nfrom . import sub\n")
    graph = import_graph(pkg)
    assert graph["hfprune.a"] == {"hfprune.b"} and graph["hfprune.b"] == {"hfprune.a"}
    assert graph["hfprune.c"] == {"hfprune.sub.d"} and graph["hfprune.sub"] == {"hfprune.sub.d"}
    assert graph["hfprune.e"] == {"hfprune.a", "hfprune.c", "hfprune.sub"}
    assert cycles(_package_edges(graph)) == [["hfprune.a", "hfprune.b"]]


def test_no_import_cycle_in_hfprune():
    graph = import_graph()
    assert "hfprune.config" in graph and graph["hfprune.validation"] >= {"hfprune.config", "hfprune.grid"}
    found = cycles(_package_edges(graph))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_over_the_size_limit():
    sizes = {mod: len(path.read_text(encoding="utf-8").splitlines()) for mod, path in _modules().items()}
    over = {mod: n for mod, n in sorted(sizes.items()) if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"
