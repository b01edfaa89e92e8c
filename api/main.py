"""The FastAPI application: ``create_app(settings)``; ``api.main:app`` for uvicorn.

``uvicorn api.main:app`` builds the app from the environment (``Settings()``) on first access of
``app``, so importing this module has no side effects.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import Runtime
from api.metrics import build_registry
from api.routes import admin, events, files, health, jobs, models, outputs, ui, usage
from loom.config import Settings
from loom.errors import InternalError, LimitExceeded, LoomError

log = logging.getLogger("loom.api")

STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "service_unavailable",
}

DESCRIPTION = """
Loom runs captioning, visual question answering and text-to-image **jobs in bulk**.

Submit a job (`POST /v1/jobs`), poll it (`GET /v1/jobs/{id}`), stream its results
(`GET /v1/jobs/{id}/results?format=jsonl|csv|coco`). Authenticate with
`Authorization: Bearer <key>` (`loom keys create --tenant NAME`). Errors are always
`{"error": {"code": ..., "message": ...}}`; item rows carry the same codes.
"""


def error_response(status: int, code: str, message: str, headers: Any = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


class BodyLimitMiddleware:
    """413 for bodies over ``limit`` bytes: by Content-Length up front, or while streaming."""

    def __init__(
        self, app: ASGIApp, limit: int, overrides: dict[str, tuple[int, str]] | None = None
    ) -> None:
        self.app = app
        self.limit = limit
        # path -> (limit, setting name): uploads of the Files API have their own, larger limit.
        self.overrides = overrides or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.overrides.get(
            scope.get("path", "").rstrip("/"), (self.limit, "LOOM_MAX_BODY_BYTES"))
        message = f"request body larger than {limit} bytes ({setting})"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    await error_response(413, "payload_too_large", message)(scope, receive, send)
                    return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise StarletteHTTPException(413, message)
            return msg

        await self.app(scope, limited_receive, send)


class InternalErrorMiddleware:
    """Any exception a route did not turn into an error response becomes a JSON 500
    ``internal_error``, here, without re-raising.

    Starlette's own last-resort handler sends the 500 and then re-raises, and uvicorn answers a
    re-raised exception by closing the connection: a keep-alive client's next request on it would
    be reset. A response that had already started (a streamed export) cannot be replaced; that
    one is re-raised so that the broken stream is closed. ``respond`` builds the 500 (the
    OpenAI-compatible app answers in OpenAI's error shape)."""

    def __init__(self, app: ASGIApp,
                 respond: Callable[[LoomError], ASGIApp] | None = None) -> None:
        self.app = app
        self.respond = respond or (lambda e: error_response(e.http_status, e.code, e.message))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:
                raise
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            await self.respond(InternalError("internal server error"))(scope, receive, send)


def _loc(loc: Any) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoomError)
    async def _loom(_: Request, exc: LoomError) -> JSONResponse:
        if exc.http_status >= 500:
            log.error("request failed: %s", exc)
        headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
        if isinstance(exc, LimitExceeded):
            headers = {"Retry-After": str(math.ceil(exc.retry_after))}
        return error_response(exc.http_status, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors()[:5]:
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            problems.append(f"{_loc(err.get('loc', ()))}: {msg}")
        return error_response(422, "invalid_request", "; ".join(problems) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.error("database error: %s", exc)
        return error_response(503, "service_unavailable", "the database is unavailable")



def create_app(
    settings: Settings | None = None,
    *,
    publish: Callable[[Any], None] | None = None,
    store: Any = None,
) -> FastAPI:
    """Build the app. ``publish`` defaults to a Celery publisher built from ``settings``."""
    from loom.db import make_engine, make_session_factory
    from loom.storage import store_from_settings

    settings = settings or Settings()
    if publish is None:
        from worker.app import make_celery, make_publisher

        publish = make_publisher(make_celery(settings))
    engine = make_engine(settings.database_url)
    runtime = Runtime(
        settings=settings,
        engine=engine,
        session_factory=make_session_factory(engine),
        store=store if store is not None else store_from_settings(settings),
        publish=publish,
    )
    extra: dict[str, Any] = {}
    if "form_limits" in inspect.signature(FastAPI.__init__).parameters:  # FastAPI >= 0.13x
        # Multipart uploads: one file per item (Starlette's default caps files at 1000).
        extra["form_limits"] = {"max_files": settings.max_items_per_request, "max_fields": 100}
    app = FastAPI(
        **extra,
        title="Loom",
        version="0.1.0",
        description=DESCRIPTION,
        openapi_tags=[
            {"name": "jobs", "description": "Submit, watch, cancel and retry jobs."},
            {"name": "results", "description": "Results, items, outputs and lineage."},
            {"name": "files", "description": "Upload manifests, datasets and images."},
            {"name": "models", "description": "Models the workers can run."},
            {"name": "ops", "description": "Health, readiness and Prometheus metrics."},
            {"name": "usage", "description": "Items, model-seconds and bytes stored per day."},
        ],
    )
    app.state.runtime = runtime
    app.state.metrics_registry = build_registry(runtime)
    # The multipart envelope around an uploaded file is small; 1 MiB covers it.
    app.add_middleware(
        BodyLimitMiddleware, limit=settings.max_body_bytes,
        overrides={"/v1/files": (settings.max_file_bytes + 2**20, "LOOM_MAX_FILE_BYTES"),
                   "/openai/v1/files": (settings.openai_file_max_bytes + 2**20,
                                        "LOOM_OPENAI_FILE_MAX_BYTES")},
    )
    app.add_middleware(InternalErrorMiddleware)  # outermost of ours: sees every failure
    install_error_handlers(app)
    for module in (jobs, files, events, outputs, models, health, ui, usage):
        app.include_router(module.router)
    app.include_router(events.secret_router)
    app.include_router(jobs.finetunes_router)
    app.include_router(admin.router)
    from api import openai_app  # OpenAI's API shapes and errors under their own prefix

    app.mount(openai_app.PREFIX, openai_app.build(runtime, InternalErrorMiddleware))
    from fastapi.staticfiles import StaticFiles

    app.mount("/ui/static", StaticFiles(directory=str(ui.HERE / "static")), name="ui-static")
    return app


_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    """``api.main.app``: built from the environment on first access (uvicorn's import string)."""
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(name)


def create_local_app() -> FastAPI:
    """What ``loom ui`` serves: the embedded state under LOOM_HOME (settings from the
    environment, auth off for the local tenant) with no broker, so "retry failed" requeues items
    for the next ``loom run``."""
    return create_app(Settings(), publish=lambda chunk: None)
