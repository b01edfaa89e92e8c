"""Liveness, readiness (database, broker, storage) and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.deps import RuntimeDep
from api.schemas import ErrorResponse, Health
from loom.errors import ServiceUnavailable

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz() -> Health:
    """The process is up (no dependencies checked)."""
    return Health(status="ok")


def _check_database(rt: Any) -> None:
    with rt.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _check_broker(rt: Any) -> None:
    url = rt.settings.broker_url
    if not url.startswith(("redis://", "rediss://")):
        return
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    finally:
        client.close()


def _check_storage(rt: Any) -> None:
    rt.store.put("_loom/readyz", b"ok", "text/plain")


@router.get("/readyz", responses={503: {"model": ErrorResponse, "description": "Not ready"}})
def readyz(rt: RuntimeDep) -> Health:
    """Ready to serve: the database, the broker and the object store each answer."""
    checks: dict[str, str] = {}
    down: list[str] = []
    for name, check in (
        ("database", _check_database), ("broker", _check_broker), ("storage", _check_storage)
    ):
        try:
            check(rt)
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            checks[name] = f"{type(exc).__name__}: {exc}"[:300]
            down.append(f"{name} ({checks[name]})")
    if down:
        raise ServiceUnavailable("not ready: " + "; ".join(down))
    return Health(status="ok", checks=checks)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
def metrics(request: Request) -> Response:
    """Prometheus metrics: jobs and items by status, queue depth, item latency, throughput."""
    data = generate_latest(request.app.state.metrics_registry)
    return Response(content=data, media_type=CONTENT_TYPE_LATEST)
