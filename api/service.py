"""What the routes do, kept out of them: validate and normalise submissions, publish, cancel
(the response bodies: api/responses.py).

Everything here is synchronous (SQLAlchemy sessions); routes run it in FastAPI's threadpool.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit

from fastapi import BackgroundTasks
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from api.deps import Runtime
from api.schemas import ItemIn, JobRequest
from loom import fetch, jobs, media, storage, storage_keys, tasks
from loom.errors import (
    BlockedUrl,
    FetchFailed,
    InvalidInput,
    InvalidKey,
    InvalidRequest,
    LoomError,
    NotFound,
    PayloadTooLarge,
)
from loom.models import Job, JobStatus, new_id

log = logging.getLogger("loom.api")
T = TypeVar("T")

MAX_MANIFEST_ITEMS = 1_000_000


def _check_url(url: str, where: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"{where}: expected an http(s) URL, got {url[:100]!r}")


def check_webhook_url(url: str) -> None:
    """The webhook's host, resolved now, must pass the SSRF guard that image URLs pass (422 if
    not); the finaliser checks it again at every hop when it fires (DNS may change meanwhile)."""
    try:
        fetch.check_url(url, policy=fetch.WEBHOOK_POLICY)
    except (BlockedUrl, InvalidInput) as exc:
        raise InvalidRequest(f"webhook_url: {exc.message}") from None
    except FetchFailed as exc:  # e.g. the name does not resolve (yet): fire time decides
        log.info("webhook_url not checked now: %s", exc.message)


def check_tenant_key(key: str, tenant_id: str, where: str) -> None:
    """Storage keys given by callers must be valid for the store (the store's own check, so a
    worker never meets a key it refuses: 422) and lie inside their tenant prefix (else: 404)."""
    try:
        storage_keys.validate_key(key)
    except InvalidKey as exc:
        raise InvalidKey(f"{where}: {exc.message}") from None
    if not key.startswith(f"{tenant_id}/"):
        raise NotFound(f"{where}: no object {key[:200]!r} in your tenant's storage")


def recorded_caps(session: Session) -> dict[str, tasks.ModelCaps]:
    """Models that workers have run (beyond the built-in ones), with the tasks they serve."""
    caps: dict[str, set[str]] = {}
    for row in jobs.model_versions(session):
        caps.setdefault(row.name, set()).update(row.tasks or [])
    return {name: tasks.ModelCaps(tasks=tuple(sorted(t))) for name, t in caps.items()}


def known_models(session: Session, settings_default: str,
                 tenant_id: str | None = None) -> dict[str, dict[str, Any]]:
    models: dict[str, dict[str, Any]] = {
        name: {"name": name, "tasks": list(caps.tasks), "versions": []}
        for name, caps in tasks.BUILTIN_MODELS.items()
    }
    models.setdefault(settings_default, {"name": settings_default, "tasks": [], "versions": []})
    for row in jobs.model_versions(session):
        entry = models.setdefault(row.name, {"name": row.name, "tasks": [], "versions": []})
        entry["versions"].append(
            {"version": row.version, "weights_sha256": row.weights_sha256, "tasks": row.tasks}
        )
        entry["tasks"] = sorted(set(entry["tasks"]) | set(row.tasks or []))
    if tenant_id is not None:  # the caller's names for models brought by reference
        for a in jobs.list_aliases(session, tenant_id=tenant_id):
            caps = tasks.caps_for(a.ref)
            models[a.name] = {"name": a.name, "tasks": list(caps.tasks) if caps else [],
                              "versions": [], "ref": a.ref, "params": a.params or {}}
    if tenant_id is not None:  # the caller's own fine-tuned models (no other tenant's)
        for m in jobs.registered_models(session, tenant_id=tenant_id):
            caps = jobs.registered_caps(session, tenant_id=tenant_id, ref=m.ref)
            entry = models.setdefault(m.name, {"name": m.name, "tasks": [], "versions": []})
            entry["tasks"] = list(caps.tasks) if caps else []
            entry["versions"].append({**jobs.model_dict(m), "version": f"v{m.version}"})
    return models


def _normalise_item(
    item: ItemIn, i: int, *, spec: tasks.TaskSpec, tenant_id: str, max_text: int,
    max_bytes: int,
) -> tuple[dict[str, Any], bytes | None]:
    """-> (input dict, decoded base64 bytes or None). Raises InvalidRequest naming items[i]."""
    where = f"items[{i}]"
    raw = item.model_dump(exclude={"metadata", "image_base64"}, exclude_none=True)
    if item.image_base64 is not None:
        raw["image_key"] = "(base64)"  # one image source: checked by the spec with the others
    inp = spec.validate_input(raw, where=where, max_text_chars=max_text)
    tasks.json_safe(item.metadata, f"{where}.metadata")
    if "image_url" in inp:
        _check_url(inp["image_url"], f"{where}.image_url")
    elif "image_key" in inp and item.image_base64 is None:
        check_tenant_key(inp["image_key"], tenant_id, f"{where}.image_key")
    if item.image_base64 is None:
        return inp, None
    del inp["image_key"]
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


def iter_manifest(store: Any, key: str, tenant_id: str) -> Iterator[ItemIn]:
    """The items of a JSONL manifest in the tenant's storage, parsed as the object streams in
    (a million-line manifest is never held whole). Errors name the line."""
    check_tenant_key(key, tenant_id, "manifest_key")
    if not store.exists(key):
        raise NotFound(f"manifest_key: no object {key[:200]!r} in your tenant's storage")
    n = 0
    for n, line in enumerate(stream_lines(store.open_stream(key)), start=1):
        if not line.strip():
            continue
        if n > MAX_MANIFEST_ITEMS:
            raise PayloadTooLarge(f"manifest has more than {MAX_MANIFEST_ITEMS} items")
        try:
            yield ItemIn.model_validate_json(line)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "line"
            raise InvalidRequest(f"manifest line {n}: {field}: {first['msg']}") from None


def stream_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Text lines of a stream of byte chunks (a chunk may end mid-line or mid-character)."""
    partial: list[bytes] = []  # the pieces of a line that spans chunks (joined once)
    for chunk in chunks:
        *whole, tail = chunk.split(b"\n")
        if whole:
            partial.append(whole[0])
            whole[0] = b"".join(partial)
            partial = []
            for line in whole:
                yield line.decode("utf-8", errors="replace")
        if tail:
            partial.append(tail)
    if partial:
        yield b"".join(partial).decode("utf-8", errors="replace")


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
        existing = jobs.existing_for_key(
            session, tenant_id=tenant_id, idempotency_key=idempotency_key, request_hash=body_hash)
        session.rollback()  # end the read; submission opens its own write transaction
        if existing is not None:
            return existing
    spec = tasks.get(req.task)
    model = req.model or settings.default_model
    tasks.json_safe(req.params, "params")
    tasks.json_safe(req.metadata, "metadata")
    if req.webhook_url:
        check_webhook_url(req.webhook_url)
    if req.parent_job_id:
        try:
            jobs.get_job(session, job_id=req.parent_job_id, tenant_id=tenant_id)
        except NotFound:
            raise NotFound(f"parent_job_id: no job {req.parent_job_id!r}") from None
    items_in: Iterable[ItemIn]
    if req.items is not None:
        items_in = list(req.items)
        count: int | None = len(items_in) + len(uploads)
        if count > settings.max_items_per_request:
            raise PayloadTooLarge(
                f"{count} items in one request; the limit is "
                f"{settings.max_items_per_request} (store a JSONL and pass manifest_key)"
            )
    else:
        assert req.manifest_key is not None
        # Streamed into the job as it is read: a manifest's size is bounded by
        # MAX_MANIFEST_ITEMS, not by this process's memory.
        items_in, count = iter_manifest(rt.store, req.manifest_key, tenant_id), None
    params = spec.validate_params(req.params, item_count=count or 0)
    model, params = jobs.resolve_alias(session, tenant_id=tenant_id, name=model, params=params)
    caps = tasks.caps_for(model, recorded_caps(session))
    if caps is None:  # one of the caller's fine-tuned models: the job pins today's latest
        found = jobs.resolve_model(session, tenant_id=tenant_id, ref=model)
        if found is not None:
            model = found.ref
            caps = jobs.registered_caps(session, tenant_id=tenant_id, ref=model)
    tasks.check_model(spec, model, caps, params)
    if uploads and not spec.image:
        raise InvalidRequest(f"task {spec.name!r} takes {', '.join(spec.texts)}, not files")
    base_seed = params.get("seed")

    def prepared() -> Iterator[tuple[dict[str, Any], bytes | None]]:
        """(item, inline image bytes or None), validated one at a time."""
        i = -1
        for i, item in enumerate(items_in):
            inp, data = _normalise_item(
                item, i, spec=spec, tenant_id=tenant_id,
                max_text=settings.max_text_chars, max_bytes=settings.max_input_bytes,
            )
            if spec.seeded:
                if inp.get("seed") is None and base_seed is not None \
                        and base_seed + i > tasks.SEED_MAX:
                    raise InvalidRequest(f"items[{i}]: params.seed {base_seed} + {i} passes "
                                         f"the largest seed {tasks.SEED_MAX}")
                inp["seed"] = tasks.item_seed(given=inp.get("seed"), base=base_seed, index=i)
            yield {"input": inp, "metadata": item.metadata}, data
        if i < 0 and req.manifest_key is not None:
            raise InvalidRequest("manifest_key: the manifest has no items")
        for j, (name, data) in enumerate(uploads, start=i + 1):
            if len(data) > settings.max_input_bytes:
                raise PayloadTooLarge(
                    f"file {name!r}: larger than {settings.max_input_bytes} bytes")
            try:
                media.image_format(data)
            except InvalidInput as exc:
                raise InvalidRequest(f"file {name!r} (items[{j}]): {exc.message}") from None
            texts = {"question": upload_question} if upload_question is not None else {}
            inp = spec.validate_input({"image_key": "(upload)", **texts},
                                      where=f"file {name!r}",
                                      max_text_chars=settings.max_text_chars)
            del inp["image_key"]
            yield {"input": inp, "metadata": {"file": name}}, data

    if count == 0:
        raise InvalidRequest("items: at least one item is required")
    job = submit_storing_inputs(
        session, rt.store, job_id=new_id(), tenant_id=tenant_id, items=prepared(),
        task=req.task, model_name=model, params=params,
        priority=req.priority, webhook_url=req.webhook_url, parent_job_id=req.parent_job_id,
        webhook_events=req.webhook_events,
        metadata=req.metadata, idempotency_key=idempotency_key, request_hash=body_hash,
        use_cache=req.cache,
        chunk_size=settings.chunk_size, max_attempts=settings.max_attempts,
        limits=jobs.Limits.from_settings(settings),
        fast_lane_items=settings.fast_lane_max_items,
    )
    publish(session, rt, job.id)
    return job


# Inline images stored per window, in parallel, while the items stream into the job.
_STORE_WINDOW = 64


def submit_storing_inputs(
    session: Session, store: Any, *, job_id: str, tenant_id: str,
    items: Iterable[tuple[dict[str, Any], bytes | None]], **kwargs: Any,
) -> Job:
    """Record the job, storing each item's inline image under the job's input keys (in
    parallel, a window at a time) before the item row that points at it is written.

    ``items``: (item {"input", "metadata"}, its inline image bytes or None), a stream. The job
    id is chosen by the caller so that the keys exist before any worker can see the items; if
    the submission fails or an earlier job wins the Idempotency-Key, what was stored goes.
    """
    stored: list[str] = []

    def put_one(i: int, item: dict[str, Any], data: bytes | None) -> dict[str, Any]:
        if data is None:
            return item
        ext = media.image_format(data)
        key = storage.input_key(tenant_id, job_id, i, ext)
        store.put(key, data, f"image/{ext}")
        stored.append(key)
        item["input"]["image_key"] = key
        return item

    def rows(pool: ThreadPoolExecutor) -> Iterator[dict[str, Any]]:
        source, start = iter(items), 0
        while window := list(itertools.islice(source, _STORE_WINDOW)):
            if sum(data is not None for _, data in window) <= 2:
                yield from (put_one(i, it, d) for i, (it, d) in enumerate(window, start))
            else:  # pool.map re-raises the first storage error
                yield from pool.map(put_one, range(start, start + len(window)),
                                    *zip(*window))
            start += len(window)

    try:
        with ThreadPoolExecutor(max_workers=16, thread_name_prefix="loom-put") as pool:
            job = jobs.submit_job(session, job_id=job_id, tenant_id=tenant_id,
                                  items=rows(pool), **kwargs)
    except BaseException:
        _discard(store, stored)  # no job row will ever point at them
        raise
    if job.id != job_id:
        # A concurrent request with the same Idempotency-Key won: its job has its own inputs.
        _discard(store, stored)
    return job


def _discard(store: Any, keys: list[str]) -> None:
    """Best effort: what this fails to delete, the orphan sweep (loom/orphans.py) removes."""
    for key in keys:
        try:
            store.delete(key)
        except LoomError as exc:
            log.warning("could not delete unused input %s: %s", key, exc.message)


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


def cancel(session: Session, rt: Runtime, *, job_id: str, tenant_id: str,
           background: BackgroundTasks) -> Job:
    """Cancel the job; when that finalised it (nothing was running), its webhook is sent after
    the response, from a session of its own (the reconciler retries what fails)."""
    job = retrying(session, lambda: jobs.cancel_job(
        session, job_id=job_id, tenant_id=tenant_id, store=rt.store))
    if job.status == JobStatus.cancelled.value and job.webhook_url:
        background.add_task(send_webhooks, rt, [job.id])
    return job


def send_webhooks(rt: Runtime, job_ids: list[str]) -> None:
    from loom import webhooks

    with rt.session_factory() as session:
        webhooks.send_due_quietly(session, job_ids=job_ids)


def publish(session: Session, rt: Runtime, job_id: str) -> None:
    """Publish the job's outbox after commit; a failure is only logged (the reconciler retries)."""
    try:
        jobs.publish_pending(session, publish=rt.publish, job_id=job_id)
    except Exception as exc:  # noqa: BLE001 - any broker failure must not fail the request
        session.rollback()
        log.warning("publishing job %s failed (the reconciler will publish it): %s", job_id, exc)
