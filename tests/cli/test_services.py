"""Service commands (no model needed): db upgrade, keys create, and the command tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LOOM = str(Path(sys.executable).parent / "loom")


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env["LOOM_HOME"] = str(home)
    return subprocess.run([LOOM, *args], env=env, capture_output=True, text=True, timeout=120,
                          cwd=home)


def test_db_upgrade_and_keys_create(tmp_path: Path) -> None:
    from loom import tenants
    from loom.db import make_engine, make_session_factory

    assert run(tmp_path, "db", "upgrade").returncode == 0
    proc = run(tmp_path, "keys", "create", "--tenant", "acme", "--name", "ci")
    assert proc.returncode == 0, proc.stderr
    secret = proc.stdout.strip()
    assert secret.startswith("loom_") and "shown once" in proc.stderr
    engine = make_engine(f"sqlite:///{tmp_path / 'loom.db'}")
    try:
        with make_session_factory(engine)() as s:
            tenant = tenants.authenticate(s, secret=secret)
            assert tenant is not None and tenant.name == "acme"
    finally:
        engine.dispose()
    bad = run(tmp_path, "keys", "create", "--tenant", " ")
    assert bad.returncode == 1 and "must not be empty" in bad.stderr


def test_command_tree() -> None:
    import typer.main

    from worker.cli import app

    root = typer.main.get_command(app)
    assert {"caption", "ask", "generate", "run", "jobs", "status", "watch", "results", "cancel",
            "retry", "submit", "api", "worker", "db", "keys", "models", "train"} <= set(
        root.commands)
    # One `loom submit` command and one embedded command per inference task in the registry.
    from loom import tasks

    commands = {spec.command for spec in tasks.inference()}
    assert {"caption", "ask", "generate", "embed"} <= commands
    # ...and finetune, whose spec has a handler of its own (a table in, a model version out).
    assert set(root.commands["submit"].commands) == commands | {"finetune"}
    assert commands | {"finetune"} <= set(root.commands)
    assert "upgrade" in root.commands["db"].commands
    assert "create" in root.commands["keys"].commands


def test_remote_commands_need_an_api(tmp_path: Path) -> None:
    proc = run(tmp_path, "submit", "generate", "a small red circle", "--seed", "1")
    assert proc.returncode == 1 and "--api" in proc.stderr
