"""The package layering holds: bagel_model (the model) <- pipelines (inference procedures) <-
cluster / bench / bagel_serve (service, benchmarks, CLI).

Imports are read with `ast` (nothing is imported), including imports inside functions,
relative imports (resolved to absolute names) and `importlib.import_module("...")` /
`__import__("...")` calls with a literal name.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVICE_LIBS = {"ray", "fastapi", "starlette", "pydantic", "uvicorn"}
UPPER_LAYERS = {"cluster", "bench", "bagel_serve"}
FORBIDDEN = {
    "bagel_model": {"pipelines"} | UPPER_LAYERS | SERVICE_LIBS,
    "pipelines": UPPER_LAYERS | SERVICE_LIBS,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
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

