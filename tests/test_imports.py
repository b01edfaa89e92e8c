"""The one-way import rules of ARCHITECTURE.md, checked in fresh interpreters.

Each package is imported (with all of its modules) in a new process, and the modules it must
never pull in are looked up in ``sys.modules``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib, json, pkgutil, sys
package, skip = sys.argv[1], set(json.loads(sys.argv[2]))
names = [package] if "." in package else [package] + [
    m.name for m in pkgutil.walk_packages(importlib.import_module(package).__path__, package + ".")
]
for name in names:
    if name not in skip:
        importlib.import_module(name)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""

# package -> (top-level modules it must never load, its modules not to import in the probe)
RULES: dict[str, tuple[set[str], list[str]]] = {
    "loom": ({"torch", "pipeline", "worker", "api"}, []),
    # pipeline.hf is the one place transformers may come in; it is still torch-only otherwise.
    "pipeline": (
        {"loom", "worker", "api", "celery", "sqlalchemy", "boto3", "fastapi", "redis", "kombu"},
        [],
    ),
    "api": ({"torch", "pipeline"}, []),
    # The Celery app is imported by the API to publish: it must stay free of torch.
    "worker.app": ({"torch", "pipeline", "api"}, []),
    "worker": ({"api"}, []),
}


def imported_top_levels(package: str, skip: list[str]) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, package, json.dumps(skip)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("package", sorted(RULES))
def test_imports_point_one_way(package: str) -> None:
    forbidden, skip = RULES[package]
    loaded = imported_top_levels(package, skip)
    assert not (loaded & forbidden), f"{package} pulls in {sorted(loaded & forbidden)}"


# --- no import cycles ------------------------------------------------------------------------

PACKAGES = ("loom", "worker", "api", "pipeline")


def _module_files() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its body (imports inside functions
    included: they are edges all the same), except under ``if TYPE_CHECKING:``. ``from a import
    b`` names the module a.b when there is one, else a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                for other in child.orelse:  # type: ignore[attr-defined]
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = alias.name
                    while target and target not in modules:
                        target = target.rpartition(".")[0]
                    if target:
                        found.add(target)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package
                    for _ in range(child.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    found.add(full if full in modules else base)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != name}


def import_cycles() -> list[list[str]]:
    """Strongly connected components of more than one module in the project's import graph."""
    modules = _module_files()
    graph = {name: _imports_of(name, path, modules) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def test_no_import_cycles() -> None:
    assert import_cycles() == []


def test_the_cycle_check_counts_function_level_imports_not_type_checking_ones(
    tmp_path: Path,
) -> None:
    # The check itself must fail on a cycle, lazy imports included: loom.tasks importing
    # loom.jobs inside a function would close tasks -> jobs -> ... -> tasks.
    modules = _module_files()
    fake = tmp_path / "tasks.py"
    fake.write_text("def f():\n    from loom import jobs\n")
    assert "loom.jobs" in _imports_of("loom.tasks", fake, modules)
    fake.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                    "    from loom import jobs\n")
    assert "loom.jobs" not in _imports_of("loom.tasks", fake, modules)
