"""/metrics shows every tenant's counts, so no API key opens it: only LOOM_METRICS_TOKEN does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TOKEN = "scrape-" + "x" * 24


@pytest.fixture
def app_with(tmp_path: Path, make_settings: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from loom import tenants
    from loom.db import upgrade

    made: list[Any] = []

    def build(**overrides: Any) -> tuple[Any, str]:
        n = len(made)
        settings = make_settings(database_url=f"sqlite:///{tmp_path / f'm{n}.db'}",
                                 storage_url=f"file://{tmp_path / 's'}", broker_url="memory://",
                                 **overrides)
        upgrade(settings.database_url)
        app = create_app(settings, publish=lambda chunk: None)
        with app.state.runtime.session_factory() as s:
            _, api_key = tenants.create_api_key(s, tenant_name="alpha")
        client = TestClient(app)
        made.append((client, app))
        return client, api_key

    yield build
    for client, app in made:
        client.close()
        app.state.runtime.engine.dispose()


def test_auth_on_needs_the_metrics_token(app_with: Any) -> None:
    c, api_key = app_with(auth="on", metrics_token=TOKEN)
    c.post("/v1/jobs", headers={"Authorization": f"Bearer {api_key}"},
           json={"task": "generate", "items": [{"prompt": "a"}]})
    for headers in ({}, {"Authorization": f"Bearer {api_key}"},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Basic eDp5"}):
        r = c.get("/metrics", headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "unauthorized" and "loom_jobs" not in r.text
        assert r.headers["www-authenticate"] == "Bearer"
    r = c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'loom_jobs{status="queued"} 1.0' in r.text


def test_auth_on_without_a_token_serves_no_metrics(app_with: Any) -> None:
    c, api_key = app_with(auth="on")
    for headers in ({}, {"Authorization": f"Bearer {api_key}"}):
        r = c.get("/metrics", headers=headers)
        assert r.status_code == 404 and "LOOM_METRICS_TOKEN" in r.json()["error"]["message"]


def test_auth_off_is_open_unless_a_token_is_set(app_with: Any) -> None:
    c, _ = app_with(auth="off")
    assert c.get("/metrics").status_code == 200
    c, _ = app_with(auth="off", metrics_token=TOKEN)
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
