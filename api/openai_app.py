"""The OpenAI-compatible API: an app of its own, mounted at ``/openai/v1`` by ``api.main``, so
that a client of OpenAI's SDK sets ``base_url="http://host:8000/openai/v1"``.

Its own app (not routers of the main one) because its errors have OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, and every invalid request is a 400 as in
OpenAI's API, while Loom's own /v1 routes keep theirs. It shares the main app's runtime
(settings, sessions, store, publisher) and its API keys.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.deps import Runtime
from api.openai_service import JobWaiter
from loom.errors import InvalidRequest, LimitExceeded, LoomError
from loom.openai_replies import error_body

log = logging.getLogger("loom.api")
PREFIX = "/openai/v1"


def error_response(status: int, message: str, *, code: str | None = None,
                   param: str | None = None, headers: Any = None) -> JSONResponse:
    return JSONResponse(error_body(message, status=status, code=code, param=param),
                        status_code=status, headers=headers)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoomError)
    async def _loom(_: Request, exc: LoomError) -> JSONResponse:
        # OpenAI answers every invalid request 400 (Loom's /v1 says 422).
        status = 400 if isinstance(exc, InvalidRequest) and exc.http_status == 422 \
            else exc.http_status
        if status >= 500:
            log.error("request failed: %s", exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if isinstance(exc, LimitExceeded):
            headers = {"Retry-After": str(math.ceil(exc.retry_after))}
        return error_response(status, exc.message, code=exc.code,
                              param=getattr(exc, "param", None), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return error_response(400, f"{param}: {msg}" if param else msg,
                              code="invalid_request", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers,
                              code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.error("database error: %s", exc)
        return error_response(503, "the database is unavailable", code="service_unavailable")


def build(runtime: Runtime, internal_errors: Any) -> FastAPI:
    """The /openai/v1 app over ``runtime`` (mount it at PREFIX). ``internal_errors`` is
    ``api.main.InternalErrorMiddleware``: an exception no handler took becomes OpenAI's 500
    there, not Starlette's plain-text one (which re-raises, and the server drops the
    connection)."""
    from api.routes import openai_batches, openai_sync

    app = FastAPI(
        title="Loom: OpenAI-compatible API", version="0.1.0",
        description="OpenAI's Files and Batch APIs and synchronous chat completions, "
                    "embeddings and image generation, served by Loom's queue and workers. "
                    "Use it with the official `openai` SDK: "
                    "`OpenAI(base_url='http://HOST:8000/openai/v1', api_key=LOOM_KEY)`.")
    app.state.runtime = runtime
    app.state.waiter = JobWaiter(runtime.session_factory)
    app.add_middleware(internal_errors, respond=lambda e: error_response(
        e.http_status, e.message, code=e.code))
    _install_handlers(app)
    app.include_router(openai_batches.router)
    app.include_router(openai_sync.router)
    return app
