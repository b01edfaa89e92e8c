"""The one-way import rules of ARCHITECTURE.md, checked in fresh interpreters.

Each package is imported (with all of its modules) in a new process, and the modules it must
never pull in are looked up in ``sys.modules``.
"""

from __future__ import annotations

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
