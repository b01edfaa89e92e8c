"""/v1/files: upload (streamed multipart), list, get, delete; in the manner of OpenAI's Files API.

A manifest of any size goes in here first, then into ``POST /v1/jobs`` as ``manifest_key``.
The body limit of this route is LOOM_MAX_FILE_BYTES (not LOOM_MAX_BODY_BYTES); Starlette spools
the upload to a temporary file and the store receives it in blocks, so memory stays flat.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Path, Query, UploadFile, status
from starlette.concurrency import run_in_threadpool

from api.deps import CallerDep, RuntimeDep, SessionDep
from api.schemas import ErrorResponse, FileDeleted, FileList, FileOut
from loom import files as core

router = APIRouter(prefix="/v1/files", tags=["files"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "No such file in your tenant"},
    422: {"model": ErrorResponse, "description": "Invalid request"},
}
Purpose = Literal["manifest", "dataset", "image"]
FileIdPath = Annotated[str, Path(max_length=64, description="File id (file-...).")]


@router.post(
    "", status_code=status.HTTP_201_CREATED,
    responses={**ERRORS, 413: {"model": ErrorResponse, "description": "File too large"}},
)
async def upload_file(
    session: SessionDep,
    rt: RuntimeDep,
    caller: CallerDep,
    file: Annotated[UploadFile, File(description="The file's bytes.")],
    purpose: Annotated[Purpose, Form(description="manifest (JSONL of items) | dataset | image")]
    = "manifest",
) -> FileOut:
    """Upload a file into your tenant's storage; returns its id, size, sha256 and storage key."""

    def _store() -> FileOut:
        row = core.store_file(
            session, rt.store, tenant_id=caller.tenant_id, f=file.file,
            filename=file.filename or "upload", purpose=purpose,
            content_type=file.content_type, max_bytes=rt.settings.max_file_bytes,
        )
        return FileOut(**core.file_dict(row))

    try:
        return await run_in_threadpool(_store)
    finally:
        await file.close()


@router.get("", responses=ERRORS)
def list_files(
    session: SessionDep,
    caller: CallerDep,
    purpose: Purpose | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> FileList:
    """Your files, newest first, with cursor pagination."""
    page = core.list_files(session, tenant_id=caller.tenant_id, purpose=purpose, limit=limit,
                           cursor=cursor)
    return FileList(data=[FileOut(**core.file_dict(f)) for f in page.items],
                    next_cursor=page.next_cursor)


@router.get("/{file_id}", responses=ERRORS)
def get_file(file_id: FileIdPath, session: SessionDep, caller: CallerDep) -> FileOut:
    return FileOut(**core.file_dict(
        core.get_file(session, file_id=file_id, tenant_id=caller.tenant_id)))


@router.delete("/{file_id}", responses=ERRORS)
def delete_file(
    file_id: FileIdPath, session: SessionDep, rt: RuntimeDep, caller: CallerDep
) -> FileDeleted:
    """Delete the file and its object (jobs that already read it keep their items)."""
    row = core.delete_file(session, rt.store, file_id=file_id, tenant_id=caller.tenant_id)
    return FileDeleted(id=row.id)
