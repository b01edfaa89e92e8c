"""Shared by the API tests (a plain module: tests/api is on sys.path)."""

from __future__ import annotations

import base64
import io
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fixtures_worker import WorkerProcess, serve

REDIS_TEST_URL = os.environ.get("LOOM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
METRICS_TOKEN = "stack-metrics-token"


def scene_png(i: int, size: int = 64) -> bytes:
    """A shapes-world scene (the domain of the built-in model), PNG-encoded."""
    from pipeline import data

    img = data.render(data.sample_scene(random.Random(i)), size=size)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def scenes(n: int, seed: int) -> list[tuple[bytes, Any]]:
    """(PNG bytes, scene) of ``n`` fresh shapes-world scenes; ``pipeline.data.caption(scene)``
    and ``questions(scene)`` are what the model should say about each."""
    from pipeline import data

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = data.sample_scene(rng)
        buf = io.BytesIO()
        data.render(scene, size=64).save(buf, format="PNG")
        out.append((buf.getvalue(), scene))
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Stack:
    url: str
    settings: Any
    session_factory: Any
    store: Any
    keys: dict[str, str]  # tenant name -> API key
    tenant_ids: dict[str, str]
    worker: WorkerProcess
    published: list[Any] = field(default_factory=list)

    def client(self, tenant: str = "alpha") -> Any:
        from loom.client import Client

        return Client(self.url, self.keys[tenant], timeout=60)

    def headers(self, tenant: str = "alpha") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}


@dataclass
class LocalApp:
    client: Any  # starlette TestClient
    app: Any
    settings: Any
    published: list[Any]
    session_factory: Any


@dataclass
class ServedApp:
    """The API behind a real uvicorn (keep-alive connections, real HTTP) on PostgreSQL."""

    url: str
    app: Any
    settings: Any
    published: list[Any]
    session_factory: Any
    keys: dict[str, str]  # tenant name -> API key
    tenant_ids: dict[str, str]

    def client(self, tenant: str = "alpha") -> Any:
        """One httpx.Client (one keep-alive connection pool) authenticated as ``tenant``."""
        import httpx

        return httpx.Client(base_url=self.url, timeout=30,
                            headers={"Authorization": f"Bearer {self.keys[tenant]}"})


@contextmanager
def served_app_with(pg_url: str, tmp_path: Path, make_settings: Any,
                    **overrides: Any) -> Iterator[ServedApp]:
    """The API on PostgreSQL + a local store, served by a real uvicorn, auth on, two tenants
    (alpha, beta), with ``overrides`` over the test settings; publish() appends to a list (no
    broker, no worker)."""
    from api.main import create_app
    from loom import tenants

    settings = make_settings(**{
        "database_url": pg_url, "storage_url": f"file://{tmp_path / 's'}",
        "broker_url": "memory://", "auth": "on", **overrides})
    published: list[Any] = []
    app = create_app(settings, publish=published.append)
    factory = app.state.runtime.session_factory
    keys: dict[str, str] = {}
    tenant_ids: dict[str, str] = {}
    with factory() as s:
        for name in ("alpha", "beta"):
            key, secret = tenants.create_api_key(s, tenant_name=name)
            keys[name], tenant_ids[name] = secret, key.tenant_id
    try:
        with serve(app) as url:
            yield ServedApp(url, app, settings, published, factory, keys, tenant_ids)
    finally:
        app.state.runtime.engine.dispose()
