"""Tenant limits over real HTTP (uvicorn, PostgreSQL): 429 with Retry-After and a message naming
the limit and the use, 413 over the per-job size, nothing half-accepted; the admin API behind its
own token; the same through the OpenAI-compatible front door; and ``loom tenants``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api_helpers import ServedApp, served_app_with

ADMIN = "admin-secret"
LOOM = str(Path(sys.executable).parent / "loom")


@pytest.fixture
def app(pg_url: str, tmp_path: Path, make_settings: Any) -> Iterator[ServedApp]:
    with served_app_with(pg_url, tmp_path, make_settings, admin_token=ADMIN,
                         tenant_max_queued_items=6, tenant_submissions_per_minute=3) as app:
        yield app


def job(n: int) -> dict[str, Any]:
    return {"task": "generate", "items": [{"prompt": f"a red circle {i}"} for i in range(n)]}


def admin(app: ServedApp, token: str | None = ADMIN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=app.url, timeout=30, headers=headers)


def test_queue_and_rate_limits_answer_429_with_retry_after(app: ServedApp) -> None:
    with app.client("alpha") as c, app.client("beta") as b:
        queue_and_rate(c, b)


def queue_and_rate(c: httpx.Client, b: httpx.Client) -> None:
    assert c.post("/v1/jobs", json=job(4)).status_code == 201
    r = c.post("/v1/jobs", json=job(3))  # 7 open items > 6
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    err = r.json()["error"]
    assert err["code"] == "limit_exceeded"
    assert "limit of 6" in err["message"] and "(4 open now)" in err["message"]
    assert c.post("/v1/jobs", json=job(2)).status_code == 201  # 6: exactly at the limit
    assert len(c.get("/v1/jobs").json()["jobs"]) == 2  # the refused one left nothing
    # Beta is not affected by alpha's queue; its third submission in a minute is its last.
    for _ in range(3):
        assert b.post("/v1/jobs", json=job(1)).status_code == 201
    r = b.post("/v1/jobs", json=job(1))
    assert r.status_code == 429 and "3 submissions per minute" in r.json()["error"]["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    # The OpenAI front door answers the same limit in OpenAI's shape, with Retry-After.
    o = b.post("/openai/v1/images/generations", json={"model": "loom-shapes", "prompt": "a red circle"})
    assert o.status_code == 429 and int(o.headers["Retry-After"]) >= 1
    assert o.json()["error"]["code"] == "limit_exceeded"


def test_admin_api_sets_limits_and_shows_use(app: ServedApp) -> None:
    for token in (None, app.keys["alpha"]):
        with admin(app, token) as bad:
            assert bad.get("/v1/admin/tenants").status_code == 401
    with admin(app) as a, app.client("alpha") as c:
        admin_limits(a, c)


def admin_limits(a: httpx.Client, c: httpx.Client) -> None:
    r = a.patch("/v1/admin/tenants/alpha/limits",
                json={"max_items_per_job": 2, "max_queued_items": 100, "weight": 2.5})
    assert r.status_code == 200, r.text
    assert r.json()["limits"] == {"max_queued_items": 100, "max_running_items": None,
                                  "submissions_per_minute": 3, "max_items_per_job": 2,
                                  "weight": 2.5}
    r = c.post("/v1/jobs", json=job(3))
    assert r.status_code == 413 and r.json()["error"]["code"] == "job_too_large"
    assert c.post("/v1/jobs", json=job(2)).status_code == 201
    listed = {t["name"]: t for t in a.get("/v1/admin/tenants").json()["tenants"]}
    assert listed["alpha"]["use"] == {"open_items": 2, "running_items": 0,
                                      "submissions_last_minute": 1}
    assert listed["beta"]["overrides"] == {} and listed["beta"]["limits"]["max_queued_items"] == 6
    assert a.patch("/v1/admin/tenants/alpha/limits",
                   json={"weight": 0}).status_code == 422
    assert a.patch("/v1/admin/tenants/nobody/limits", json={"weight": 1}).status_code == 404
    r = a.patch("/v1/admin/tenants/alpha/limits", json={"reset": True})
    assert r.json()["overrides"] == {}


def test_tenants_cli(app: ServedApp, pg_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env.update({"LOOM_DATABASE_URL": pg_url, "LOOM_HOME": str(tmp_path / "h"),
                "COLUMNS": "200"})

    def loom(*args: str) -> str:
        proc = subprocess.run([LOOM, "tenants", *args], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = loom("limits", "beta", "--max-running", "5", "--weight", "3")
    assert "beta" in out and "5*" in out and "3*" in out
    with app.client("beta") as b:
        assert b.post("/v1/jobs", json=job(1)).status_code == 201
    import json

    rows = {t["name"]: t for t in json.loads(loom("list", "--json"))}
    assert rows["beta"]["limits"]["max_running_items"] == 5
    assert rows["beta"]["use"]["open_items"] == 1
    assert rows["alpha"]["overrides"] == {}
    proc = subprocess.run([LOOM, "tenants", "limits", "nobody", "--weight", "1"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no tenant named 'nobody'" in proc.stderr


def test_a_waiting_job_says_where_it_stands(app: ServedApp) -> None:
    with app.client("alpha") as c, app.client("beta") as b:
        assert c.post("/v1/jobs", json=job(4)).status_code == 201
        second = c.post("/v1/jobs", json=job(1)).json()
        assert second["queue"] is None  # lists and submissions do not compute it
        assert b.post("/v1/jobs", json=job(3)).status_code == 201
        q = c.get(f"/v1/jobs/{second['id']}").json()["queue"]
    assert q == {"items_ahead": 7, "own_items_ahead": 4, "other_items_ahead": 3, "share": 0.5,
                 "reason": "behind 4 items of the tenant's earlier or more urgent jobs"}
