"""The dependency rules of ARCHITECTURE.md, checked from the code's own imports.

Each rule is read from the source with :mod:`ast` (every ``import`` statement, also those inside
functions, except under ``if TYPE_CHECKING:``), so a lazy import cannot slip past it. The
serving side's torch-freedom is also checked by really importing every module with torch
blocked, since a rule on paper says nothing about what a third-party import drags in.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("moco", "exports", "indexer", "app")

# The torch-free base of `indexer` that `moco` and `exports` may import (ARCHITECTURE.md).
BASE = {"indexer", "indexer.images", "indexer.analysis", "indexer.files", "indexer.cli", "indexer.quality",
        "indexer.threads"}
BASE_FOR_EXPORTS = BASE | {"indexer.runtime"}

# part -> (project packages or modules it must never import, third-party roots it must never import)
FORBIDDEN: dict[str, tuple[set[str], set[str]]] = {
    "moco": ({"app", "exports"}, set()),
    "exports": ({"app"}, set()),
    "indexer": ({"moco", "exports", "app"}, {"torch", "torchvision"}),
    "app": ({"moco", "exports"}, {"torch", "torchvision"}),
}
# Web-server libraries live in the indexer's server package (indexer.server and its modules) only.
SERVER_ONLY = {"fastapi", "uvicorn", "starlette"}


@dataclass(frozen=True)
class Import:
    """One imported name: ``module`` is what Python loads, ``names`` what the statement takes from it."""

    source: str  # the importing module, dotted
    line: int
    module: str
    names: tuple[str, ...]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """Like :func:`ast.walk`, but skipping ``if TYPE_CHECKING:`` bodies (they never run)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield other
                yield from _walk(other)
            continue
        yield child
        yield from _walk(child)


def imports_of(path: Path, root: Path = ROOT) -> list[Import]:
    source = module_name(path, root)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(source, node.lineno, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(Import(source, node.lineno, module, tuple(a.name for a in node.names)))
    return found


def all_imports(root: Path = ROOT) -> list[Import]:
    return [imp for path in project_files(root) for imp in imports_of(path, root)]


def project_modules(root: Path = ROOT) -> set[str]:
    return {module_name(p, root) for p in project_files(root)}


def targets(imp: Import, modules: set[str]) -> set[str]:
    """The project modules an import loads: ``from indexer import images`` loads ``indexer.images``."""
    loaded = {imp.module} if imp.module in modules else set()
    loaded |= {f"{imp.module}.{name}" for name in imp.names if f"{imp.module}.{name}" in modules}
    return loaded


def _within(module: str, roots: set[str]) -> bool:
    return any(module == r or module.startswith(r + ".") for r in roots)


def violations(root: Path = ROOT) -> list[str]:
    modules = project_modules(root)
    problems = []
    for imp in all_imports(root):
        part = imp.source.split(".")[0]
        forbidden_own, forbidden_third = FORBIDDEN[part]
        where = f"{imp.source}:{imp.line} imports {imp.module}"
        loaded = targets(imp, modules) or {imp.module}
        for module in loaded:
            if _within(module, forbidden_own) or module.split(".")[0] in forbidden_third:
                problems.append(f"{where}: {part} must never import {module.split('.')[0]}")
            if module.split(".")[0] in SERVER_ONLY and not _within(imp.source, {"indexer.server"}):
                problems.append(f"{where}: web-server libraries only inside indexer.server")
        if part == "exports":
            for module in loaded:
                if _within(module, {"moco"}) and module != "moco.checkpoint":
                    problems.append(f"{where}: {module}: exports reads training output only through moco.checkpoint")
        if part in ("moco", "exports"):
            allowed = BASE_FOR_EXPORTS if part == "exports" else BASE
            for module in loaded:
                if _within(module, {"indexer"}) and module not in allowed:
                    problems.append(f"{where}: {part} may import only the torch-free base of indexer "
                                    f"({', '.join(sorted(allowed - {'indexer'}))})")
    return problems


def test_imports_follow_the_dependency_table() -> None:
    assert violations() == []


def test_the_rule_checker_catches_a_forbidden_import(tmp_path: Path) -> None:
    """The checker itself can fail: made-up modules that break the table are each reported."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("", encoding="utf-8")
    (tmp_path / "moco" / "checkpoint.py").write_text("", encoding="utf-8")
    (tmp_path / "indexer" / "store.py").write_text("", encoding="utf-8")
    (tmp_path / "indexer" / "probe.py").write_text(
        "def f():\n    import torch\n    from moco import checkpoint\n", encoding="utf-8")
    (tmp_path / "moco" / "probe.py").write_text("from indexer import store\nimport app\n", encoding="utf-8")
    (tmp_path / "moco" / "train.py").write_text("", encoding="utf-8")
    (tmp_path / "exports" / "probe.py").write_text("from moco import checkpoint, train\n", encoding="utf-8")
    (tmp_path / "app" / "probe.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\nimport fastapi\n",
        encoding="utf-8")
    (tmp_path / "indexer" / "server").mkdir()
    (tmp_path / "indexer" / "server" / "__init__.py").write_text("", encoding="utf-8")
    (tmp_path / "indexer" / "server" / "probe.py").write_text("import fastapi\nimport uvicorn\n", encoding="utf-8")
    (tmp_path / "indexer" / "served.py").write_text("from starlette import requests\n", encoding="utf-8")
    found = violations(tmp_path)
    assert not any(v.startswith("indexer.server.probe:") for v in found)  # the server package may
    assert any(v.startswith("indexer.served:1 ") and "server" in v for v in found)  # a look-alike may not
    assert any(v.startswith("indexer.probe:2 ") and "torch" in v for v in found)
    assert any(v.startswith("indexer.probe:3 ") and "moco" in v for v in found)
    assert any(v.startswith("moco.probe:1 ") and "torch-free base" in v for v in found)
    assert any(v.startswith("moco.probe:2 ") and "app" in v for v in found)
    assert any(v.startswith("app.probe:4 ") and "server" in v for v in found)
    assert any(v.startswith("exports.probe:1 ") and "moco.train" in v for v in found)
    assert not any(v.startswith("exports.probe:1 ") and ": moco.checkpoint:" in v for v in found)
    assert not any(v.startswith("app.probe:3 ") for v in found)  # TYPE_CHECKING imports never run


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in all_imports():
        for target in targets(imp, modules):
            # a package's __init__ importing its own submodules lazily is how indexer stays light
            if target != imp.source and not imp.source.startswith(target + "."):
                graph[imp.source].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    assert find_cycle(import_graph()) is None


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def private_uses() -> list[str]:
    """``from x import _name`` or ``x._name`` where ``x`` is another project module."""
    modules = project_modules()
    problems = []
    for path in project_files():
        source = module_name(path)
        for imp in imports_of(path):
            if imp.module in modules and imp.module != source:
                problems += [f"{source}:{imp.line} imports {imp.module}.{n}" for n in imp.names
                             if n.startswith("_") and not n.startswith("__")]
        aliases = {}
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    if f"{node.module}.{a.name}" in modules:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in modules:
                        aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != source):
                problems.append(f"{source}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return problems


def test_no_module_uses_another_modules_private_names() -> None:
    assert private_uses() == []


def _modules_under(*packages: str) -> list[str]:
    return sorted(module_name(p) for pkg in packages for p in (ROOT / pkg).rglob("*.py")
                  if p.name != "main.py")


@pytest.mark.parametrize("package", ["indexer", "app"])
def test_serving_side_imports_without_torch(package: str) -> None:
    """Every module of the serving side imports with torch, moco and exports blocked.

    ``app/main.py`` is the Streamlit entry point (it draws at import); its own imports are
    covered by the static rule above. Pages are imported too: they draw only when Streamlit runs
    them as ``__main__``.
    """
    modules = _modules_under(package)
    code = ("import importlib, sys\n"
            "for blocked in ('torch', 'torchvision', 'moco', 'exports'): sys.modules[blocked] = None\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "loaded = [m for m in sys.modules if sys.modules[m] is not None and m.split('.')[0] == 'torch']\n"
            "assert not loaded, loaded\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STREAMLIT_LOG_LEVEL": "error"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
