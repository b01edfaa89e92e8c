"""GET /v1/jobs/{id}/events: the job's live event stream (Server-Sent Events).

Each poll opens a short session (loom.jobs.stream.poll) and closes it; the stream holds no
database connection between polls. Progress is throttled to at most 1 / PROGRESS_INTERVAL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Path, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import CallerDep, RuntimeDep, SessionDep, ViewerDep
from api.routes.jobs import ERRORS
from loom.jobs import stream

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

POLL_SECONDS = 0.5
PROGRESS_INTERVAL = 0.5  # at most 2 progress events a second
KEEPALIVE_SECONDS = 15.0


@router.get("/{job_id}/events", responses={**ERRORS, 200: {
    "content": {"text/event-stream": {}},
    "description": "started, progress, item_failed, cancelled, finished (then the stream ends)"}},
    response_class=StreamingResponse)
async def events(
    job_id: Annotated[str, Path(max_length=64)],
    request: Request,
    rt: RuntimeDep,
    session: SessionDep,
    caller: ViewerDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=100)] = None,
) -> StreamingResponse:
    """Live events of a job; reconnect with ``Last-Event-ID`` to resume after the last one seen
    (item failures are replayed from the database)."""
    session.close()  # authentication is done: give its connection back for the stream's length
    state = stream.StreamState.resume(last_event_id)

    def poll() -> list[dict]:
        with rt.session_factory() as session:
            return stream.poll(session, job_id=job_id, tenant_id=caller.tenant_id, state=state,
                               now=time.monotonic(), min_interval=PROGRESS_INTERVAL)

    first = await run_in_threadpool(poll)  # NotFound (404) before the stream starts

    async def body() -> AsyncIterator[str]:
        batch, quiet = first, 0.0
        yield "retry: 2000\n\n"
        while True:
            for event in batch:
                yield stream.format_sse(event)
            if state.finished or await request.is_disconnected():
                return
            if batch:
                quiet = 0.0
            elif quiet >= KEEPALIVE_SECONDS:
                quiet = 0.0
                yield ": keepalive\n\n"
            await asyncio.sleep(POLL_SECONDS)
            quiet += POLL_SECONDS
            batch = await run_in_threadpool(poll)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


secret_router = APIRouter(prefix="/v1", tags=["jobs"])


@secret_router.get("/webhook-secret", responses=ERRORS)
def webhook_secret(session: SessionDep, caller: CallerDep) -> dict[str, str]:
    """Your tenant's webhook signing secret (Standard Webhooks, ``whsec_...``; made on first
    use). Verify ``webhook-signature`` = ``v1,`` + base64 HMAC-SHA256 of
    ``{webhook-id}.{webhook-timestamp}.{body}`` keyed with the base64-decoded part after
    ``whsec_``."""
    from loom import tenants

    return {"secret": tenants.webhook_secret(session, tenant_id=caller.tenant_id)}
