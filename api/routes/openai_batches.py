"""/openai/v1/files and /openai/v1/batches: OpenAI's Files and Batch APIs (thin routes over
``loom.files``, ``loom.openai_batches`` and ``api.openai_service``)."""

from __future__ import annotations

import logging
import threading
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    BackgroundTasks,
    Body,
    File,
    Form,
    Path,
    Query,
    UploadFile,
)
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api import openai_service
from api.deps import CallerDep, Runtime, RuntimeDep, SessionDep
from loom import files, jobs, openai_batches
from loom.errors import BadRequest
from loom.jobs.types import encode_cursor
from loom.openai_replies import file_object

log = logging.getLogger("loom.api")
router = APIRouter()
IdPath = Annotated[str, Path(max_length=64)]


# --- files -----------------------------------------------------------------------------------


@router.post("/files")
async def upload_file(
    rt: RuntimeDep, session: SessionDep, caller: CallerDep,
    file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()],
) -> dict[str, Any]:
    """Upload a batch input file (JSONL), streamed to storage like ``POST /v1/files``."""
    if purpose != "batch":
        raise BadRequest("purpose: Loom takes files for batches: purpose=batch",
                         param="purpose")

    def store() -> dict[str, Any]:
        row = files.store_file(session, rt.store, tenant_id=caller.tenant_id, f=file.file,
                               filename=file.filename or "batch.jsonl", purpose="batch",
                               content_type=file.content_type,
                               max_bytes=rt.settings.openai_file_max_bytes)
        return file_object(row)

    try:
        return await run_in_threadpool(store)
    finally:
        await file.close()


@router.get("/files")
def list_files(
    session: SessionDep, caller: CallerDep, purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    """Newest first; ``after`` is the id of the last file of the previous page."""
    cursor = None
    if after is not None:
        anchor = files.get_file(session, file_id=after, tenant_id=caller.tenant_id)
        cursor = encode_cursor([anchor.created_at, anchor.id])
    page = files.list_files(session, tenant_id=caller.tenant_id, purpose=purpose,
                            limit=min(limit, files.MAX_PAGE), cursor=cursor)
    data = [file_object(f) for f in page.items]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": page.next_cursor is not None}


@router.get("/files/{file_id}")
def get_file(file_id: IdPath, session: SessionDep, caller: CallerDep) -> dict[str, Any]:
    return file_object(files.get_file(session, file_id=file_id, tenant_id=caller.tenant_id))


@router.get("/files/{file_id}/content", response_class=StreamingResponse)
def file_content(file_id: IdPath, session: SessionDep, rt: RuntimeDep,
                 caller: CallerDep) -> StreamingResponse:
    """The file's bytes (an input file, or a batch's output or error file), streamed."""
    row = files.get_file(session, file_id=file_id, tenant_id=caller.tenant_id)
    return StreamingResponse(rt.store.open_stream(row.storage_key),
                             media_type=row.content_type or "application/octet-stream",
                             headers={"Content-Length": str(row.size_bytes)})


@router.delete("/files/{file_id}")
def delete_file(file_id: IdPath, session: SessionDep, rt: RuntimeDep,
                caller: CallerDep) -> dict[str, Any]:
    row = files.delete_file(session, rt.store, file_id=file_id, tenant_id=caller.tenant_id)
    return {"id": row.id, "object": "file", "deleted": True}


# --- batches ---------------------------------------------------------------------------------


@router.post("/batches")
def create_batch(body: Annotated[dict[str, Any], Body()], session: SessionDep, rt: RuntimeDep,
                 caller: CallerDep, background: BackgroundTasks) -> dict[str, Any]:
    """Create a batch: its input file is validated and its jobs submitted before the answer,
    which is the batch ``in_progress`` (or ``failed``, with ``errors``)."""
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str):
        raise BadRequest("input_file_id: required", param="input_file_id")
    source = files.get_file(session, file_id=file_id, tenant_id=caller.tenant_id)
    if source.purpose != "batch":
        raise BadRequest(f"input_file_id: file {file_id} was not uploaded with purpose=batch",
                         param="input_file_id")
    batch = openai_batches.create(
        session, tenant_id=caller.tenant_id, input_file_id=file_id,
        endpoint=body.get("endpoint"), completion_window=body.get("completion_window"),
        metadata=body.get("metadata"))
    batch = openai_service.start_batch(session, rt, tenant_id=caller.tenant_id, batch=batch)
    return _answer(session, rt, batch, background)


@router.get("/batches")
def list_batches(
    session: SessionDep, caller: CallerDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    rows, has_more = jobs.list_batches(session, tenant_id=caller.tenant_id, after=after,
                                       limit=limit)
    data = [openai_batches.batch_object(session, b) for b in rows]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


@router.get("/batches/{batch_id}")
def get_batch(batch_id: IdPath, session: SessionDep, rt: RuntimeDep, caller: CallerDep,
              background: BackgroundTasks) -> dict[str, Any]:
    jobs.get_batch(session, batch_id=batch_id, tenant_id=caller.tenant_id)  # 404 first
    batch = openai_batches.refresh(session, rt.store, batch_id=batch_id, write=False)
    return _answer(session, rt, batch, background)


@router.post("/batches/{batch_id}/cancel")
def cancel_batch(batch_id: IdPath, session: SessionDep, rt: RuntimeDep, caller: CallerDep,
                 background: BackgroundTasks) -> dict[str, Any]:
    batch = openai_batches.cancel(session, rt.store, batch_id=batch_id,
                                  tenant_id=caller.tenant_id)
    return _answer(session, rt, batch, background)


def _answer(session: Any, rt: Runtime, batch: Any, background: BackgroundTasks) -> dict[str, Any]:
    """The batch object; when its jobs are done, its files are written after the answer (the
    next poll finds it finished), by one request of this process at a time."""
    if batch.status in ("finalizing", "cancelling"):
        background.add_task(_write_files, rt, batch.id)
    return openai_batches.batch_object(session, batch)


_writing: set[str] = set()
_writing_lock = threading.Lock()


def _write_files(rt: Runtime, batch_id: str) -> None:
    with _writing_lock:
        if batch_id in _writing:
            return
        _writing.add(batch_id)
    try:
        with rt.session_factory() as session:
            openai_batches.refresh(session, rt.store, batch_id=batch_id)
    except Exception:  # the reconciler writes them later
        log.exception("writing the files of batch %s failed", batch_id)
    finally:
        with _writing_lock:
            _writing.discard(batch_id)
