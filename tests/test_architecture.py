"""The layering of docs/architecture.md, checked on the source: dependencies point one way, with no circle.

Every `import` and `from ... import` that `ast` finds in gpg_vl/, tasks/ (gpg_vl_tasks) and demo/ (gpg_vl_demo)
counts, inside functions and `if TYPE_CHECKING:` blocks included: a lazy import that closes a loop hides the
knot, it does not untie it. An edge goes to the module named (`from gpg_vl import hub` is an edge to
gpg_vl.hub); the parent package a dotted import runs first is not counted as an edge of its own.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"gpg_vl": ROOT / "gpg_vl", "gpg_vl_tasks": ROOT / "tasks", "gpg_vl_demo": ROOT / "demo"}
PLUGINS = ("gpg_vl_tasks", "gpg_vl_demo")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the three packages."""
    modules = {}
    for package, folder in PACKAGES.items():
        for file in sorted(folder.rglob("*.py")):
            parts = [package, *file.relative_to(folder).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return modules


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that `name` is or lies inside (None for third-party names)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def imports_of(module: str, modules: dict[str, Path]) -> dict[str, int]:
    """The project modules `module` imports anywhere in its file -> the line of the first such import."""
    file = modules[module]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                package = module.split(".") if file.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import sub` names the submodule when there is one, else the package itself
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            target = _known(name, modules)
            if target and target != module:
                found.setdefault(target, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    modules = project_modules()
    return {m: imports_of(m, modules) for m in modules}


def import_circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return circles


def describe(circle: list[str], graph: dict[str, dict[str, int]]) -> str:
    edges = [f"{a} -> {b} (line {graph[a][b]})" for a in circle for b in sorted(graph[a]) if b in circle]
    return "import circle: " + "; ".join(edges)


def documented_layers() -> dict[str, int]:
    """Module (relative to gpg_vl, or `gpg_vl_tasks.*`) -> its layer number, from the table in docs/architecture.md."""
    layers = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        row = re.match(r"\| (\d)\. [^|]+\| ([^|]+) \|", line)
        for name in re.findall(r"`([\w.]+(?:\.\*)?)`", row.group(2) if row else ""):
            layers[name] = int(row.group(1))
    return layers


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    if module.split(".")[0] in PLUGINS:
        return layers.get(module.split(".")[0] + ".*")
    return layers.get("__init__" if module == "gpg_vl" else module.removeprefix("gpg_vl."))


def test_the_walker_finds_lazy_relative_and_submodule_imports(tmp_path, monkeypatch):
    """The checks below are only as good as the walker: it must see an import inside a function, a relative
    import, and `from pkg import sub` as an edge to the submodule, and report a circle they close."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("from .c import x\n")
    (pkg / "c.py").write_text("import json\n\ndef g():\n    import pkg.a\n")
    monkeypatch.setitem(PACKAGES, "pkg", pkg)
    graph = {m: e for m, e in import_graph().items() if m.startswith("pkg")}
    assert graph == {"pkg": {}, "pkg.a": {"pkg.b": 2}, "pkg.b": {"pkg.c": 1}, "pkg.c": {"pkg.a": 4}}
    assert import_circles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_every_package_has_modules():
    modules = project_modules()
    for package in PACKAGES:
        assert sum(m.startswith(package + ".") for m in modules) >= 3, package


def test_no_import_circle_lazy_imports_included():
    graph = import_graph()
    circles = import_circles(graph)
    assert not circles, "\n".join(describe(c, graph) for c in circles)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_the_library_never_imports_a_plugin_package(plugin):
    """gpg_vl sits below tasks/ and demo/: a plugin imports the library, never the reverse."""
    upward = [
        f"{module} imports {target} (line {line})"
        for module, targets in import_graph().items() if module.split(".")[0] == "gpg_vl"
        for target, line in targets.items() if target.split(".")[0] == plugin
    ]  # fmt: skip
    assert not upward, "\n".join(upward)


def test_every_import_follows_the_layers_of_docs_architecture():
    """docs/architecture.md matches the code: every module has a layer in its table, and imports only its own
    layer or lower ones."""
    layers, graph = documented_layers(), import_graph()
    missing = [m for m in graph if layer_of(m, layers) is None]
    assert not missing, f"modules with no layer in docs/architecture.md: {missing}"
    upward = [
        f"{module} (layer {layer_of(module, layers)}) imports {target} (layer {layer_of(target, layers)}, line {line})"
        for module, targets in graph.items() for target, line in targets.items()
        if layer_of(target, layers) > layer_of(module, layers)
    ]  # fmt: skip
    assert not upward, "\n".join(upward)


MAX_MODULE_LINES = 450


def test_no_module_is_over_450_lines():
    """Modules stay small (issue 25's bound): a module past it holds a second job that wants its own home."""
    long = {m: n for m, f in project_modules().items() if (n := len(f.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
