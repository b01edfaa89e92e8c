"""Shared by the API tests (a plain module: tests/api is on sys.path)."""

from __future__ import annotations

import base64
import io
import os
import random
from dataclasses import dataclass, field
from typing import Any

from fixtures_worker import WorkerProcess

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
