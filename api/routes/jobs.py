"""/v1/jobs: submit (JSON or multipart), list, status, items, results, dedupe, cancel, retry."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    BackgroundTasks,
    File,
    Form,
    Header,
    Path,
    Query,
    Request,
    UploadFile,
    status,
)
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from api import responses, service
from api.deps import CallerDep, RuntimeDep, SessionDep, SettingsDep, ViewerDep
from api.schemas import (
    DedupeGroup,
    DedupeMember,
    DedupeOut,
    ErrorResponse,
    FinetuneRequest,
    ItemList,
    JobList,
    JobOut,
    JobRequest,
    ResultFormat,
    ResultView,
    RetryOut,
    TaskName,
    VerifyOut,
    VerifyReportOut,
)
from loom import exports, vectors
from loom import files as stored_files
from loom import results as results_out
from loom import jobs as core
from loom.errors import InvalidRequest
from loom.models import ItemStatus, JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
finetunes_router = APIRouter(prefix="/v1/finetunes", tags=["jobs"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "No such job in your tenant"},
    422: {"model": ErrorResponse, "description": "Invalid request"},
}
SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    409: {"model": ErrorResponse, "description": "Idempotency-Key reused with another body"},
    413: {"model": ErrorResponse, "description": "Body, items or an input too large"},
}
IdemHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Same key + same body -> the same job; same key + other body -> 409.",
    ),
]
JobIdPath = Annotated[str, Path(max_length=64, description="Job id.")]
Limit = Annotated[int, Query(ge=1, le=500, description="Page size.")]
Cursor = Annotated[str | None, Query(max_length=200, description="From next_cursor.")]


@router.post("", status_code=status.HTTP_201_CREATED, responses=SUBMIT_ERRORS)
def submit_job(
    req: JobRequest,
    session: SessionDep,
    rt: RuntimeDep,
    caller: CallerDep,
    idempotency_key: IdemHeader = None,
) -> JobOut:
    """Submit a job. Items carry image_url / image_key / image_base64 (+question) or prompt."""
    body = req.model_dump(mode="json")
    if req.manifest_key:
        # Idempotency compares what the manifest holds, not where it was uploaded: a retried
        # `submit_dataset` uploads the same rows again under a new file key.
        sha = stored_files.sha256_of_key(session, tenant_id=caller.tenant_id, key=req.manifest_key)
        if sha is not None:
            body["manifest_key"] = f"sha256:{sha}"
        session.rollback()  # end the read
    body_hash = core.request_hash(body)
    job = service.submit(
        session, rt, tenant_id=caller.tenant_id, req=req,
        idempotency_key=idempotency_key, body_hash=body_hash,
    )
    return responses.job_out(session, job)


@finetunes_router.post("", status_code=status.HTTP_201_CREATED, responses=ERRORS)
def submit_finetune(req: FinetuneRequest, session: SessionDep, rt: RuntimeDep,
                    caller: CallerDep) -> JobOut:
    """Fine-tune a model on labelled rows: a finetune job (one item, checkpointed, resumed on
    another worker if its worker dies) whose result is a registered model version. Follow it
    with GET /v1/jobs/{id} or its events; run the result with ``"model": NAME``."""
    from api.finetunes import submit_finetune as submit

    job = submit(session, rt, tenant_id=caller.tenant_id, rows_key=req.rows_key,
                 name=req.name, base=req.base, hyper=req.hyper, val_fraction=req.val_fraction)
    return responses.job_out(session, job)


@router.post("/upload", status_code=status.HTTP_201_CREATED, responses=SUBMIT_ERRORS)
async def upload_job(
    session: SessionDep,
    rt: RuntimeDep,
    caller: CallerDep,
    files: Annotated[list[UploadFile], File(description="Images; one item each.")],
    request: Annotated[
        str | None, Form(description="The JobRequest as JSON (items optional).")
    ] = None,
    task: Annotated[TaskName | None, Form()] = None,
    model: Annotated[str | None, Form(max_length=200)] = None,
    question: Annotated[str | None, Form(description="vqa: asked of every file.")] = None,
    params: Annotated[str | None, Form(description="JSON object.")] = None,
    priority: Annotated[int | None, Form(ge=0, le=9)] = None,
    webhook_url: Annotated[str | None, Form(max_length=2048)] = None,
    parent_job_id: Annotated[str | None, Form(max_length=64)] = None,
    idempotency_key: IdemHeader = None,
) -> JobOut:
    """Submit local images as multipart files, with the job's fields as form fields or as a
    JSON ``request`` field."""
    fields: dict[str, Any] = {}
    if request:
        try:
            fields = json.loads(request)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"request: not valid JSON ({exc.msg})") from None
        if not isinstance(fields, dict):
            raise InvalidRequest("request: expected a JSON object")
    extra: dict[str, Any] = {
        "task": task, "model": model, "priority": priority,
        "webhook_url": webhook_url, "parent_job_id": parent_job_id,
    }
    if params:
        try:
            extra["params"] = json.loads(params)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"params: not valid JSON ({exc.msg})") from None
    fields.update({k: v for k, v in extra.items() if v is not None})
    fields.setdefault("items", [] if "manifest_key" not in fields else None)
    try:
        req = JobRequest.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "request"
        raise InvalidRequest(f"{where}: {err['msg']}") from None
    uploads: list[tuple[str, bytes]] = []
    digest = hashlib.sha256()
    for f in files:
        data = await f.read()
        name = (f.filename or f"file{len(uploads)}").rsplit("/", 1)[-1][:255]
        uploads.append((name, data))
        digest.update(hashlib.sha256(data).digest())
    body = req.model_dump(mode="json") | {"_files": digest.hexdigest(), "_question": question}
    from starlette.concurrency import run_in_threadpool

    def _submit() -> JobOut:
        job = service.submit(
            session, rt, tenant_id=caller.tenant_id, req=req, idempotency_key=idempotency_key,
            body_hash=core.request_hash(body), uploads=uploads, upload_question=question,
        )
        return responses.job_out(session, job)

    return await run_in_threadpool(_submit)


@router.get("", responses=ERRORS)
def list_jobs(
    session: SessionDep,
    caller: CallerDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> JobList:
    """Your jobs, newest first, with cursor pagination."""
    page = core.list_jobs(
        session, tenant_id=caller.tenant_id,
        status=status_.value if status_ else None, limit=limit, cursor=cursor,
    )
    return JobList(
        jobs=[responses.job_out(session, j) for j in page.items], next_cursor=page.next_cursor
    )


@router.get("/{job_id}", responses=ERRORS)
def get_job(job_id: JobIdPath, session: SessionDep, settings: SettingsDep,
            caller: CallerDep) -> JobOut:
    """Status, counts per item status, progress, timestamps, items/s and ETA; while it waits,
    where it stands in the queue and why (``queue``)."""
    job = core.get_job(session, job_id=job_id, tenant_id=caller.tenant_id)
    return responses.job_out(session, job, settings=settings)


@router.get("/{job_id}/items", responses=ERRORS, tags=["results"])
def list_items(
    job_id: JobIdPath,
    request: Request,
    session: SessionDep,
    rt: RuntimeDep,
    caller: CallerDep,
    status_: Annotated[ItemStatus | None, Query(alias="status")] = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> ItemList:
    """The job's items in index order (filter by status), with their outputs and errors."""
    page = core.list_items(
        session, job_id=job_id, tenant_id=caller.tenant_id,
        status=status_.value if status_ else None, limit=limit, cursor=cursor,
    )
    base = str(request.base_url)
    outputs = responses.outputs_for(session, page.items)
    return ItemList(
        items=[responses.item_out(rt, base, item, outputs.get(item.id)) for item in page.items],
        next_cursor=page.next_cursor,
    )


@router.get(
    "/{job_id}/results",
    responses={
        **ERRORS,
        200: {
            "description": "JSONL (one row per item), CSV, a COCO captions JSON document, "
            "Parquet (every column) or a WebDataset tar (images, .txt, .json per item).",
            "content": {"application/x-ndjson": {}, "text/csv": {}, "application/json": {},
                        "application/vnd.apache.parquet": {}, "application/x-tar": {}},
        },
    },
    response_class=StreamingResponse,
    tags=["results"],
)
def results(
    job_id: JobIdPath,
    request: Request,
    session: SessionDep,
    rt: RuntimeDep,
    caller: ViewerDep,  # the job page's download links send the login cookie
    format: ResultFormat = "jsonl",  # noqa: A002 - the query parameter's name
    view: Annotated[ResultView, Query(description="full rows, or the task's own columns")] = "full",
    drop_images: Annotated[bool, Query(
        description="Leave a dataset's image column out of the table formats.")] = False,
) -> StreamingResponse:
    """Stream the results; image outputs are presigned (S3) or /v1/outputs/{id}/content URLs."""
    job = core.get_job(session, job_id=job_id, tenant_id=caller.tenant_id)
    base = str(request.base_url)
    tenant_id = caller.tenant_id

    def rows() -> Any:
        with rt.session_factory() as s:
            for row in exports.result_rows(s, job_id=job.id, tenant_id=tenant_id):
                yield exports.with_url(row, lambda o: responses.output_url(rt, base, o))

    media, ext = exports.MEDIA_TYPES[format]
    body = results_out.stream(format, rows(), job=core.job_dict(job), store=rt.store, view=view,
                              drop_images=drop_images)
    return StreamingResponse(
        body,
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{job.id}.{ext}"'},
    )


@router.post("/{job_id}/dedupe", responses=ERRORS, tags=["results"])
def dedupe(
    job_id: JobIdPath,
    session: SessionDep,
    rt: RuntimeDep,
    caller: CallerDep,
    threshold: Annotated[float, Query(ge=-1.0, le=1.0, description=(
        "Cosine at or above which two items are near-duplicates."))] = vectors.DEFAULT_THRESHOLD,
) -> DedupeOut:
    """Duplicate groups of an embed job: the same input (sha256) or cosine >= threshold.
    Computed on request from the job's stored vectors (the same code as ``loom dedupe``)."""
    table = vectors.job_vectors(session, rt.store, job_id=job_id, tenant_id=caller.tenant_id)
    groups = vectors.group(table, threshold)
    members: dict[int, list[DedupeMember]] = {}
    for rec in vectors.group_records(table, groups):
        members.setdefault(rec.pop("group"), []).append(
            DedupeMember(**{k: v for k, v in rec.items() if k != "size"}))
    return DedupeOut(
        job_id=job_id, threshold=threshold, vectors=len(table),
        duplicates=sum(len(g.rows) - 1 for g in groups),
        groups=[DedupeGroup(group=g.id, size=len(g.rows), members=members[g.id]) for g in groups],
    )


@router.post("/{job_id}/cancel", responses={**ERRORS, 409: {"model": ErrorResponse}})
def cancel(job_id: JobIdPath, session: SessionDep, rt: RuntimeDep, caller: CallerDep,
           background: BackgroundTasks) -> JobOut:
    """Cancel: queued items at once, running ones at the workers' next batch boundary."""
    job = service.cancel(session, rt, job_id=job_id, tenant_id=caller.tenant_id,
                         background=background)
    return responses.job_out(session, job)


@router.post("/{job_id}/retry", responses={**ERRORS, 409: {"model": ErrorResponse}})
def retry(job_id: JobIdPath, session: SessionDep, rt: RuntimeDep, caller: CallerDep) -> RetryOut:
    """Requeue the job's failed items (only those) and publish them."""
    n = service.retrying(
        session, lambda: core.retry_failed(session, job_id=job_id, tenant_id=caller.tenant_id))
    if n:
        service.publish(session, rt, job_id)
    job = core.get_job(session, job_id=job_id, tenant_id=caller.tenant_id)
    return RetryOut(job=responses.job_out(session, job), requeued=n)


@router.post(
    "/{job_id}/verify",
    responses={**ERRORS, 409: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
def verify(
    job_id: JobIdPath,
    session: SessionDep,
    rt: RuntimeDep,
    caller: CallerDep,
    repair: Annotated[bool, Query(description="Requeue the items whose output is lost.")] = False,
) -> VerifyOut:
    """Check every output object's existence and sha256; ``repair`` requeues exactly the items
    whose output is missing or corrupt (a new attempt; the old lineage is kept as an event)."""
    report = core.verify_job(session, job_id=job_id, store=rt.store, tenant_id=caller.tenant_id,
                             repair=repair)
    if report.requeued:
        service.publish(session, rt, job_id)
    job = core.get_job(session, job_id=job_id, tenant_id=caller.tenant_id)
    return VerifyOut(job=responses.job_out(session, job),
                     report=VerifyReportOut.model_validate(report.to_dict()))
