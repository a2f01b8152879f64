"""The package layering holds: bagel_model (the model) <- pipelines (inference procedures) <-
cluster / bench / bagel_serve (service, benchmarks, CLI); and no module of the project imports
itself through others (no import circles, even for type hints only).

Imports are read with `ast` (nothing is imported), including imports inside functions or under
`if TYPE_CHECKING:`, relative imports (resolved to absolute names) and
`importlib.import_module("...")` / `__import__("...")` calls with a literal name.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVICE_LIBS = {"ray", "fastapi", "starlette", "pydantic", "uvicorn"}
UPPER_LAYERS = {"cluster", "bench", "bagel_serve"}
PACKAGES = ("bagel_model", "pipelines", *sorted(UPPER_LAYERS), "tests")
FORBIDDEN = {
    "bagel_model": {"pipelines"} | UPPER_LAYERS | SERVICE_LIBS,
    "pipelines": UPPER_LAYERS | SERVICE_LIBS,
}


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Absolute names of every module `source` (the text of `module`) imports."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                found.add(node.args[0].value)
    return found


def package_files(package: str) -> list[Path]:
    """The package's .py files (none if the folder does not exist, e.g. cluster/ before it is written)."""
    folder = REPO / package
    return sorted(folder.rglob("*.py")) if folder.is_dir() else []


def test_scanner_sees_what_it_should():
    src = (
        "import os, ray.serve\nfrom fastapi import FastAPI\nfrom ..pipelines.tasks import understand\n"
        "from . import loader\nfrom .errors import CheckpointError\n"
        "def f():\n    import pydantic\n    import importlib\n    importlib.import_module('cluster.app')\n"
        "    __import__('starlette')\n"
    )
    found = imported_modules(src, "bagel_model.loader")
    assert {"os", "ray.serve", "fastapi", "pipelines.tasks", "bagel_model.loader", "bagel_model.errors",
            "pydantic", "cluster.app", "starlette"} <= found
    assert imported_modules("from . import x", "pipelines", is_package=True) == {"pipelines", "pipelines.x"}
    assert {n.split(".")[0] for n in violations(found, FORBIDDEN["bagel_model"])} == \
        {"cluster", "fastapi", "pipelines", "pydantic", "ray", "starlette"}
    assert violations(found, FORBIDDEN["pipelines"]) == \
        ["cluster.app", "fastapi", "fastapi.FastAPI", "pydantic", "ray.serve", "starlette"]


def violations(found: set[str], forbidden: set[str]) -> list[str]:
    return sorted(name for name in found if name.split(".")[0] in forbidden)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package):
    files = package_files(package)
    assert len(files) >= 5, f"{package}: too few files found ({len(files)})"
    bad = {}
    all_found: set[str] = set()
    for path in files:
        found = imported_modules(path.read_text(encoding="utf-8"), module_name(path),
                                 is_package=path.name == "__init__.py")
        all_found |= found
        hits = violations(found, FORBIDDEN[package])
        if hits:
            bad[str(path.relative_to(REPO))] = hits
    assert bad == {}, f"{package} imports from layers above it or service libraries: {bad}"
    # The scan did read real imports.
    assert "torch" in all_found
    if package == "pipelines":
        assert any(name.startswith("bagel_model.") for name in all_found)



def import_graph(files: list[Path], root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name resolves to its longest module prefix,
    so `from pkg.mod import name` is an edge to pkg.mod)."""
    sources = {module_name(p, root): p for p in files}
    graph = {}
    for module, path in sources.items():
        found = imported_modules(path.read_text(encoding="utf-8"), module, is_package=path.name == "__init__.py")
        targets = set()
        for name in found:
            parts = name.split(".")
            prefixes = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
            target = next((p for p in prefixes if p in sources), None)
            if target is not None and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph.get(module, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    return next((c for m in sorted(graph) if (c := visit(m))), None)


def test_cycle_finder_sees_circles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]


def test_graph_resolves_names_to_modules(tmp_path):
    (tmp_path / "pkg").mkdir()
    files = {"pkg/__init__.py": "", "pkg/a.py": "from .b import Thing\nimport pkg.c as c\n",
             "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import X\n",
             "pkg/c.py": "import os\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    graph = import_graph(sorted(tmp_path.rglob("*.py")), tmp_path)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b", "pkg.c"}, "pkg.b": {"pkg.a"}, "pkg.c": set()}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_no_import_circles():
    files = [p for package in PACKAGES for p in package_files(package)]
    graph = import_graph(files)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the scan read the tree
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
