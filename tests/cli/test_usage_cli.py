"""``loom usage``, the console script in subprocesses: embedded (the SQLite under LOOM_HOME,
tenant ``local``) and remote (``--api`` / LOOM_API_URL against a served API, the key's tenant).
Both print the report of ``loom.jobs.usage_report``; neither shows another tenant's usage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest

from fixtures_worker import serve
from loom import jobs, tenants
from loom.jobs import ItemResult

LOOM = str(Path(sys.executable).parent / "loom")
D1, D2 = date(2024, 3, 10), date(2024, 3, 11)


def loom(home: Path, *args: str, env_extra: dict[str, str] | None = None,
         ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env.update({"LOOM_HOME": str(home), "COLUMNS": "200", **(env_extra or {})})
    return subprocess.run([LOOM, *args], env=env, capture_output=True, text=True, timeout=120,
                          cwd=home)


def _use(session_factory: Any, tenant: str, model: str, n: int, *, size: int,
         day: date) -> None:
    """A job of ``tenant`` whose n items all succeed on ``day`` (one model call of 4)."""
    with session_factory() as s:
        tid = tenants.ensure_tenant(s, name=tenant).id
        s.commit()
        at = datetime(day.year, day.month, day.day, 12)
        job = jobs.submit_job(s, tenant_id=tid, task="generate", model_name=model,
                              items=[{"input": {"prompt": "p"}}] * n, chunk_size=8,
                              max_attempts=3, now=at)
        claimed = jobs.claim_items(s, job_id=job.id, start=0, end=n, worker_id="w", limit=n,
                                   lease_seconds=60, now=at)
        jobs.complete_items(s, worker_id="w", now=at, results=[ItemResult(
            c.id, "image", storage_key=f"k/{c.job_id}/{c.index}.png", size_bytes=size,
            timings={"infer_ms": 100.0, "infer_batch_size": 4.0}, model_version="1",
            weights_sha256="ab" * 32, attempt=c.attempts) for c in claimed])


@pytest.fixture
def home(tmp_path: Path) -> Iterator[tuple[Path, Any]]:
    """LOOM_HOME with its SQLite: the local tenant's usage on two days and two models, and
    another tenant's in the same database."""
    from loom.db import make_engine, make_session_factory, upgrade

    url = f"sqlite:///{tmp_path / 'loom.db'}"
    upgrade(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    _use(factory, tenants.DEFAULT_TENANT, "loom-shapes", 4, size=2000, day=D1)
    _use(factory, tenants.DEFAULT_TENANT, "loom-shapes", 2, size=2000, day=D2)
    _use(factory, tenants.DEFAULT_TENANT, "other-model", 1, size=10, day=D2)
    _use(factory, "someone-else", "loom-shapes", 3, size=999, day=D1)
    try:
        yield tmp_path, factory
    finally:
        engine.dispose()


def _items(**counts: int) -> dict[str, int]:
    return {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0, **counts}


def test_embedded_usage(home: tuple[Path, Any]) -> None:
    path, factory = home
    proc = loom(path, "usage", "--since", "2024-03-10", "--until", "2024-03-11", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["tenant"]["name"] == "local"
    assert [(d["day"], d["model"], d["items"], d["model_seconds"], d["bytes_stored"])
            for d in report["days"]] == [
        ("2024-03-10", "loom-shapes", _items(succeeded=4), 0.1, 8000),
        ("2024-03-11", "loom-shapes", _items(succeeded=2), 0.05, 4000),
        ("2024-03-11", "other-model", _items(succeeded=1), 0.025, 10),
    ]
    assert report["total"] == {"items": _items(succeeded=7), "model_seconds": 0.175,
                               "bytes_stored": 12010}
    with factory() as s:  # the same report as the library's, for the local tenant
        local = tenants.ensure_tenant(s, name=tenants.DEFAULT_TENANT).id
        assert report == jobs.usage_report(s, tenant_id=local, since=D1, until=D2)

    # Piped without --json: one tab-separated line per day and model, raw numbers.
    piped = loom(path, "usage", "--since", "2024-03-10", "--until", "2024-03-10",
                 "--model", "loom-shapes")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.splitlines() == ["2024-03-10\tloom-shapes\t4\t0\t0\t0\t0\t0.1\t8000"]
    # The default range is the last 30 days: 2024 is long gone.
    assert json.loads(loom(path, "usage", "--json").stdout)["days"] == []


def test_embedded_bad_dates(home: tuple[Path, Any]) -> None:
    path, _ = home
    bad = loom(path, "usage", "--since", "2024-02-30")
    assert bad.returncode == 1 and "--since '2024-02-30': expected a date" in bad.stderr
    backwards = loom(path, "usage", "--since", "2024-03-11", "--until", "2024-03-10")
    assert backwards.returncode == 1 and "is after until" in backwards.stderr


def test_remote_usage(home: tuple[Path, Any], make_settings: Any) -> None:
    """The same database behind an API with auth on: the key's tenant, over HTTP."""
    from api.main import create_app

    path, factory = home
    settings = make_settings(database_url=f"sqlite:///{path / 'loom.db'}",
                             storage_url=f"file://{path / 'store'}", broker_url="memory://",
                             auth="on")
    with factory() as s:
        _, key = tenants.create_api_key(s, tenant_name="someone-else")
    app = create_app(settings, publish=lambda chunk: None)
    elsewhere = path / "elsewhere"  # remote: no LOOM_HOME state is read
    elsewhere.mkdir()
    try:
        with serve(app) as url:
            proc = loom(elsewhere, "usage", "--since", "2024-03-10", "--until",
                        "2024-03-11", "--json", "--api", url, "--api-key", key)
            assert proc.returncode == 0, proc.stderr
            report = json.loads(proc.stdout)
            # LOOM_API_URL / LOOM_API_KEY work like the flags; piped, the lines are the rows.
            env = {"LOOM_API_URL": url, "LOOM_API_KEY": key}
            piped = loom(elsewhere, "usage", "--since", "2024-03-10", "--until",
                         "2024-03-11", env_extra=env)
            refused = loom(elsewhere, "usage", "--since", "2024-03-11", "--until",
                           "2024-03-10", env_extra=env)
            no_key = loom(elsewhere, "usage", "--api", url)
    finally:
        app.state.runtime.engine.dispose()
    assert report["tenant"]["name"] == "someone-else"
    assert [(d["day"], d["model"], d["items"], d["bytes_stored"]) for d in report["days"]] == [
        ("2024-03-10", "loom-shapes", _items(succeeded=3), 2997)]
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.splitlines() == ["2024-03-10\tloom-shapes\t3\t0\t0\t0\t0\t0.075\t2997"]
    assert refused.returncode == 1 and "invalid_request: since" in refused.stderr
    assert no_key.returncode == 1 and "unauthorized" in no_key.stderr
