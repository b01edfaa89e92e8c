"""Liveness, readiness (database, broker, storage) and Prometheus metrics."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.deps import RuntimeDep
from api.schemas import ErrorResponse, Health
from loom.errors import NotFound, ServiceUnavailable, Unauthorized

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


metrics_bearer = HTTPBearer(
    auto_error=False, scheme_name="MetricsToken",
    description="LOOM_METRICS_TOKEN (not an API key): /metrics shows every tenant's counts.")


def require_metrics_token(
    rt: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(metrics_bearer)],
) -> None:
    """/metrics aggregates all tenants, so an API key (one tenant) is not enough: it takes its
    own token. With auth on and no LOOM_METRICS_TOKEN it is off (404); with auth off (one local
    tenant) it is open unless a token is set."""
    token = rt.settings.metrics_token
    if not token:
        if rt.settings.auth_enabled:
            raise NotFound("/metrics is off: set LOOM_METRICS_TOKEN to scrape it")
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("/metrics needs 'Authorization: Bearer <LOOM_METRICS_TOKEN>'")


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(require_metrics_token)],
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"},
        401: {"model": ErrorResponse, "description": "Missing or wrong LOOM_METRICS_TOKEN"},
        404: {"model": ErrorResponse, "description": "Off (auth on, no LOOM_METRICS_TOKEN)"},
    },
)
def metrics(request: Request) -> Response:
    """Prometheus metrics: jobs and items by status, queue depth, item latency, throughput.
    Needs ``Authorization: Bearer <LOOM_METRICS_TOKEN>`` (all tenants' counts)."""
    data = generate_latest(request.app.state.metrics_registry)
    return Response(content=data, media_type=CONTENT_TYPE_LATEST)
