"""What the routes do, kept out of them: validate and normalise submissions, build responses.

Everything here is synchronous (SQLAlchemy sessions); routes run it in FastAPI's threadpool.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from api.deps import Runtime
from api.schemas import ItemError, ItemIn, ItemOut, JobOut, JobRequest, OutputOut
from loom import jobs, media, storage
from loom.errors import (
    IdempotencyConflict,
    InputMissing,
    InvalidInput,
    InvalidRequest,
    LoomError,
    NotFound,
    PayloadTooLarge,
)
from loom.models import Item, Job, ModelVersion, Output, new_id

log = logging.getLogger("loom.api")
T = TypeVar("T")

# Model names the API always offers (the API never imports pipeline code to ask).
KNOWN_MODELS: dict[str, list[str]] = {"loom-shapes": ["caption", "vqa", "generate"]}
MAX_MANIFEST_ITEMS = 1_000_000


def request_hash(body: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a request (sorted keys, no spaces)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _check_url(url: str, where: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"{where}: expected an http(s) URL, got {url[:100]!r}")


def check_tenant_key(key: str, tenant_id: str, where: str) -> None:
    """Storage keys given by callers must lie inside their own tenant prefix (else: not found)."""
    segments = key.split("/")
    if not key.startswith(f"{tenant_id}/") or any(s in ("", ".", "..") for s in segments):
        raise NotFound(f"{where}: no object {key[:200]!r} in your tenant's storage")


def known_models(session: Session, settings_default: str) -> dict[str, dict[str, Any]]:
    models: dict[str, dict[str, Any]] = {
        name: {"name": name, "tasks": list(tasks), "versions": []}
        for name, tasks in KNOWN_MODELS.items()
    }
    models.setdefault(settings_default, {"name": settings_default, "tasks": [], "versions": []})
    for row in session.scalars(select(ModelVersion).order_by(ModelVersion.created_at)):
        entry = models.setdefault(row.name, {"name": row.name, "tasks": [], "versions": []})
        entry["versions"].append(
            {"version": row.version, "weights_sha256": row.weights_sha256, "tasks": row.tasks}
        )
        entry["tasks"] = sorted(set(entry["tasks"]) | set(row.tasks or []))
    return models


def _normalise_item(
    item: ItemIn, i: int, *, task: str, tenant_id: str, max_text: int, max_bytes: int
) -> tuple[dict[str, Any], bytes | None]:
    """-> (input dict, decoded base64 bytes or None). Raises InvalidRequest naming items[i]."""
    where = f"items[{i}]"
    for name in ("question", "prompt"):
        text = getattr(item, name)
        if text is not None and len(text) > max_text:
            raise InvalidRequest(
                f"{where}.{name} is {len(text)} characters; the limit is {max_text}"
            )
    sources = [n for n in ("image_url", "image_key", "image_base64") if getattr(item, n)]
    data: bytes | None = None
    inp: dict[str, Any] = {}
    if task == "generate":
        if sources:
            raise InvalidRequest(f"{where}: task 'generate' takes a prompt, not {sources[0]}")
        if not item.prompt or not item.prompt.strip():
            raise InvalidRequest(f"{where}.prompt: required for task 'generate'")
        inp["prompt"] = item.prompt
        return inp, None
    if len(sources) != 1:
        raise InvalidRequest(
            f"{where}: give exactly one of image_url, image_key, image_base64 "
            f"(got {len(sources)})"
        )
    if task == "vqa":
        if not item.question or not item.question.strip():
            raise InvalidRequest(f"{where}.question: required for task 'vqa'")
        inp["question"] = item.question
    if item.image_url:
        if len(item.image_url) > 2048:
            raise InvalidRequest(f"{where}.image_url: longer than 2048 characters")
        _check_url(item.image_url, f"{where}.image_url")
        inp["image_url"] = item.image_url
    elif item.image_key:
        check_tenant_key(item.image_key, tenant_id, f"{where}.image_key")
        inp["image_key"] = item.image_key
    else:
        assert item.image_base64 is not None
        if len(item.image_base64) > max_bytes * 4 // 3 + 4:
            raise PayloadTooLarge(f"{where}.image_base64: image larger than {max_bytes} bytes")
        try:
            data = base64.b64decode(item.image_base64, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"{where}.image_base64: not valid base64") from None
        try:
            media.image_format(data)
        except InvalidInput as exc:
            raise InvalidRequest(f"{where}.image_base64: {exc.message}") from None
    return inp, data


def _seed(item: ItemIn, i: int, params: dict[str, Any]) -> int:
    if item.seed is not None:
        return item.seed
    base = params.get("seed")
    if isinstance(base, int) and not isinstance(base, bool) and base >= 0:
        return base + i
    return random.SystemRandom().randrange(2**31)


def load_manifest(store: Any, key: str, tenant_id: str) -> list[ItemIn]:
    check_tenant_key(key, tenant_id, "manifest_key")
    try:
        raw = store.get(key)
    except InputMissing:
        raise NotFound(f"manifest_key: no object {key[:200]!r} in your tenant's storage") from None
    out: list[ItemIn] = []
    for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(ItemIn.model_validate_json(line))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "line"
            raise InvalidRequest(f"manifest line {n}: {field}: {first['msg']}") from None
        if len(out) > MAX_MANIFEST_ITEMS:
            raise PayloadTooLarge(f"manifest has more than {MAX_MANIFEST_ITEMS} items")
    if not out:
        raise InvalidRequest("manifest_key: the manifest has no items")
    return out


def submit(
    session: Session,
    rt: Runtime,
    *,
    tenant_id: str,
    req: JobRequest,
    idempotency_key: str | None,
    body_hash: str,
    uploads: Sequence[tuple[str, bytes]] = (),
    upload_question: str | None = None,
) -> Job:
    """Validate, store inline inputs, record the job (one transaction), publish after commit.

    ``uploads`` are (file name, bytes) of multipart files: each becomes an item after the
    request's own items, with metadata {"file": name}.
    """
    settings = rt.settings
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 200:
            raise InvalidRequest("Idempotency-Key header: 1..200 characters")
        existing = session.scalar(
            select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key)
        )
        if existing is not None:
            if existing.request_hash != body_hash:
                raise IdempotencyConflict(
                    "Idempotency-Key was already used with a different request body"
                )
            return existing
    model = req.model or settings.default_model
    if model not in known_models(session, settings.default_model) and not model.startswith("hf:"):
        raise InvalidRequest(f"model: unknown model {model!r}; see GET /v1/models")
    if req.webhook_url:
        _check_url(req.webhook_url, "webhook_url")
    if req.parent_job_id:
        try:
            jobs.get_job(session, job_id=req.parent_job_id, tenant_id=tenant_id)
        except NotFound:
            raise NotFound(f"parent_job_id: no job {req.parent_job_id!r}") from None
    if req.items is not None:
        items_in = list(req.items)
        if len(items_in) + len(uploads) > settings.max_items_per_request:
            raise PayloadTooLarge(
                f"{len(items_in) + len(uploads)} items in one request; the limit is "
                f"{settings.max_items_per_request} (store a JSONL and pass manifest_key)"
            )
    else:
        assert req.manifest_key is not None
        items_in = load_manifest(rt.store, req.manifest_key, tenant_id)
    job_id = new_id()
    items: list[dict[str, Any]] = []
    blobs: list[tuple[int, bytes, dict[str, Any]]] = []
    for i, item in enumerate(items_in):
        inp, data = _normalise_item(
            item, i, task=req.task, tenant_id=tenant_id,
            max_text=settings.max_text_chars, max_bytes=settings.max_input_bytes,
        )
        if req.task == "generate":
            inp["seed"] = _seed(item, i, req.params)
        if data is not None:
            blobs.append((i, data, inp))
        items.append({"input": inp, "metadata": item.metadata})
    for name, data in uploads:
        i = len(items)
        if len(data) > settings.max_input_bytes:
            raise PayloadTooLarge(f"file {name!r}: larger than {settings.max_input_bytes} bytes")
        try:
            media.image_format(data)
        except InvalidInput as exc:
            raise InvalidRequest(f"file {name!r} (items[{i}]): {exc.message}") from None
        inp: dict[str, Any] = {}
        if req.task == "vqa":
            question = upload_question or req.params.get("question")
            if not isinstance(question, str) or not question.strip():
                raise InvalidRequest("vqa uploads need a 'question' field (asked of every file)")
            if len(question) > settings.max_text_chars:
                raise InvalidRequest(
                    f"question is {len(question)} characters; the limit is "
                    f"{settings.max_text_chars}"
                )
            inp["question"] = question
        blobs.append((i, data, inp))
        items.append({"input": inp, "metadata": {"file": name}})
    if req.task == "generate" and blobs:
        raise InvalidRequest("task 'generate' takes prompts, not files")
    if not items:
        raise InvalidRequest("items: at least one item is required")
    job = submit_storing_inputs(
        session, rt.store, job_id=job_id, tenant_id=tenant_id,
        blobs=[(i, data, inp) for i, data, inp in blobs],
        task=req.task, model_name=model, items=items, params=req.params,
        priority=req.priority, webhook_url=req.webhook_url, parent_job_id=req.parent_job_id,
        metadata=req.metadata, idempotency_key=idempotency_key, request_hash=body_hash,
        chunk_size=settings.chunk_size, max_attempts=settings.max_attempts,
    )
    publish(session, rt, job.id)
    return job


def submit_storing_inputs(
    session: Session, store: Any, *, job_id: str, tenant_id: str,
    blobs: list[tuple[int, bytes, dict[str, Any]]], **kwargs: Any,
) -> Job:
    """Store inline inputs under the job's input keys (in parallel), then record the job.

    ``blobs``: (item index, bytes, that item's input dict, which gets ``image_key``). The job id
    is chosen here so that the keys exist before any worker can see the items.
    """
    def put_one(i: int, data: bytes, inp: dict[str, Any]) -> None:
        ext = media.image_format(data)
        key = storage.input_key(tenant_id, job_id, i, ext)
        store.put(key, data, f"image/{ext}")
        inp["image_key"] = key

    if len(blobs) <= 2:
        for blob in blobs:
            put_one(*blob)
    else:
        with ThreadPoolExecutor(max_workers=min(16, len(blobs))) as pool:
            for future in [pool.submit(put_one, *blob) for blob in blobs]:
                future.result()  # re-raises the first storage error
    return jobs.submit_job(session, job_id=job_id, tenant_id=tenant_id, **kwargs)


RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock detected, serialization failure


def retrying(session: Session, fn: Callable[[], T], attempts: int = 4) -> T:
    """Run a state change again when PostgreSQL aborts it as a deadlock victim (or on a
    serialization failure): both are transient by definition."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OperationalError as exc:
            session.rollback()
            if getattr(exc.orig, "sqlstate", None) not in RETRYABLE_SQLSTATES or attempt == attempts:
                raise
            log.info("retrying after %s (attempt %d)", type(exc.orig).__name__, attempt)
            time.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


def publish(session: Session, rt: Runtime, job_id: str) -> None:
    """Publish the job's outbox after commit; a failure is only logged (the reconciler retries)."""
    try:
        jobs.publish_pending(session, publish=rt.publish, job_id=job_id)
    except Exception as exc:  # noqa: BLE001 - any broker failure must not fail the request
        session.rollback()
        log.warning("publishing job %s failed (the reconciler will publish it): %s", job_id, exc)


# --- responses ---------------------------------------------------------------------------------


def job_out(session: Session, job: Job) -> JobOut:
    p = jobs.job_progress(session, job_id=job.id)
    counts = {k: int(v) for k, v in dict(p.counts).items()}
    total = int(p.total) or job.item_count
    return JobOut(
        id=job.id,
        task=job.task,
        model=job.model_name,
        status=job.status,
        priority=job.priority,
        params=job.params or {},
        metadata=job.job_metadata or None,
        parent_job_id=job.parent_job_id,
        webhook_url=job.webhook_url,
        item_count=job.item_count,
        counts=counts,
        done=int(p.done),
        progress=(int(p.done) / total) if total else 1.0,
        items_per_second=p.items_per_second,
        eta_seconds=p.eta_seconds,
        error=ItemError(code=job.error_code, message=job.error_message) if job.error_code else None,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        updated_at=job.updated_at,
    )


def output_url(rt: Runtime, base_url: str, output: Output) -> str | None:
    if not output.storage_key:
        return None
    try:
        url = rt.store.url(output.storage_key)
    except LoomError:
        url = None
    return url or f"{base_url.rstrip('/')}/v1/outputs/{output.id}/content"


def item_out(rt: Runtime, base_url: str, item: Item, output: Output | None) -> ItemOut:
    out = None
    if output is not None:
        out = OutputOut(
            id=output.id,
            kind=output.kind,
            text=output.text,
            url=output_url(rt, base_url, output),
            content_type=output.content_type,
            sha256=output.sha256,
            size_bytes=output.size_bytes,
        )
    return ItemOut(
        id=item.id,
        index=item.index,
        status=item.status,
        input=item.input or {},
        metadata=item.item_metadata,
        attempts=item.attempts,
        error=ItemError(code=item.error_code, message=item.error_message)
        if item.error_code
        else None,
        output=out,
        started_at=item.started_at,
        finished_at=item.finished_at,
    )


def outputs_for(session: Session, items: Sequence[Item]) -> dict[int, Output]:
    """The outputs of a page of items, in one query (not one lazy load per item)."""
    ids = [item.id for item in items]
    if not ids:
        return {}
    return {o.item_id: o for o in session.scalars(select(Output).where(Output.item_id.in_(ids)))}


def get_output(session: Session, *, output_id: int, tenant_id: str) -> Output:
    row = session.execute(
        select(Output)
        .join(Job, Job.id == Output.job_id)
        .where(Output.id == output_id, Job.tenant_id == tenant_id)
    ).scalar_one_or_none()
    if row is None or not row.storage_key:
        raise NotFound(f"no output {output_id}")
    return row
