"""OpenAI-compatible batches (/openai/v1/batches) on Loom jobs.

A batch is an input file of request lines run as Loom jobs: the valid lines are grouped by
(task, model, job params) and each group is ONE job whose items are its lines' items, in line
order (a chat batch of captions is one caption job; a chat batch that mixes questions and
captions is a vqa job and a caption job). Every job is a job like any other: its page, event
stream, lineage, cancel and results work as for any job; its metadata names the batch
(``openai_batch``), each item's metadata its line and ``custom_id``.

States (the row's ``status``; timestamps as OpenAI's):

    validating --lines checked, jobs submitted--> in_progress --jobs finished--> finalizing
      |                                             |  \\--window passed--> finalizing (expired_at)
      '--> failed (duplicate custom_id,             '--cancel--> cancelling
           too many lines, empty file)              finalizing --files written--> completed | expired
                                                    cancelling --jobs finished, files--> cancelled

A line that is not a valid request (malformed JSON, another endpoint, a body the model cannot
serve) goes to the error file and never fails the batch; a duplicate ``custom_id`` fails the
whole batch at validation, as OpenAI does. When every job is finished, the output and error
files are written from the item rows (``loom.openai_batch_files``). ``refresh`` does that (and
expiry) for whoever looks first: the API answering a poll, or the reconciler's ``tick`` in every
worker; both are idempotent. An expired batch's open items are cancelled and its finished
results kept, each unfinished line an error line ``batch_expired``.
"""

from __future__ import annotations

import json
import logging
import pickle
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import IO, Any

from sqlalchemy.orm import Session

from loom import jobs, openai_batch_files, openai_compat
from loom.errors import BadRequest, InvalidState, LoomError
from loom.models import JOB_TERMINAL, Batch, utcnow
from loom.openai_replies import unix
from loom.storage import Store

log = logging.getLogger(__name__)

WINDOWS = {"24h": timedelta(hours=24)}  # completion_window: OpenAI accepts "24h" only
OPEN = ("validating", "in_progress", "cancelling", "finalizing")
MAX_JOBS = 16  # distinct (task, model, params) groups of lines per batch
MAX_ERRORS = 100  # batch-level errors listed (duplicate custom_ids)
# A batch left validating this long had its request die midway: the reconciler fails it.
STALE_VALIDATION = timedelta(hours=1)
# The API writes a batch's files right after marking it finalizing; the reconcilers leave such
# a batch alone this long, rather than all writing the same files at once.
WRITE_GRACE = timedelta(seconds=60)
_TERMINAL = {s.value for s in JOB_TERMINAL}
# Prepares one line's body: (the model the job records, its Loom work); raises LoomError.
Prepare = Callable[[Mapping[str, Any]], tuple[str, openai_compat.Work]]


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


# --- validation --------------------------------------------------------------------------


@dataclass
class Group:
    """The lines that become one job, spooled to a temporary file as they are read."""

    task: str
    model: str
    params: dict[str, Any]
    # Closed by Validation.close once its job is submitted.
    spool: IO[bytes] = field(default_factory=lambda: tempfile.TemporaryFile())  # noqa: SIM115
    items: int = 0

    def add(self, rows: list[tuple[dict[str, Any], bytes | None]]) -> None:
        for row in rows:
            pickle.dump(row, self.spool)  # our own process' data, read back below
        self.items += len(rows)

    def rows(self) -> Iterator[tuple[dict[str, Any], bytes | None]]:
        self.spool.seek(0)
        for _ in range(self.items):
            yield pickle.load(self.spool)


@dataclass
class Validation:
    total: int = 0  # non-blank lines
    groups: list[Group] = field(default_factory=list)
    invalid: list[dict[str, Any]] = field(default_factory=list)  # invalid_record entries
    errors: list[dict[str, Any]] = field(default_factory=list)  # batch-level: it fails
    model: str | None = None

    def close(self) -> None:
        for g in self.groups:
            g.spool.close()


def validate_lines(lines: Iterable[str], *, batch_id: str, endpoint: str, prepare: Prepare,
                   max_lines: int) -> Validation:
    """Read the input file's lines once: each valid line's items are spooled into its group,
    each invalid line becomes an error line; duplicate ``custom_id``s and too many lines are
    batch-level errors."""
    v = Validation()
    seen: set[str] = set()
    by_key: dict[str, Group] = {}
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        v.total += 1
        if v.total > max_lines:
            v.errors = [{"code": "too_many_requests", "line": n, "param": None, "message":
                         f"the input file has more than {max_lines} requests "
                         "(LOOM_OPENAI_BATCH_MAX_LINES)"}]
            return v
        try:
            line = json.loads(raw)
        except ValueError as exc:
            v.invalid.append(openai_batch_files.invalid_record(
                batch_id, line=n, custom_id=None, code="invalid_json",
                message=f"line {n} is not JSON: {exc}"))
            continue
        custom_id = line.get("custom_id") if isinstance(line, dict) else None
        if isinstance(custom_id, str) and custom_id:
            if custom_id in seen:
                if len(v.errors) < MAX_ERRORS:
                    v.errors.append({"code": "duplicate_custom_id", "line": n,
                                     "param": "custom_id", "message":
                                     f"custom_id {custom_id[:100]!r} is used more than once"})
                continue
            seen.add(custom_id)
        try:
            model, work = _check_line(line, endpoint=endpoint, prepare=prepare)
        except LoomError as exc:
            v.invalid.append(openai_batch_files.invalid_record(
                batch_id, line=n, custom_id=custom_id, code=exc.code, message=exc.message))
            continue
        key = json.dumps([work.task, model, work.params], sort_keys=True)
        group = by_key.get(key)
        if group is None:
            if len(by_key) == MAX_JOBS:
                v.invalid.append(openai_batch_files.invalid_record(
                    batch_id, line=n, custom_id=custom_id, code="too_many_variants",
                    message=f"a batch runs at most {MAX_JOBS} distinct (task, model, "
                            "parameters) combinations; this line would be one more"))
                continue
            group = by_key[key] = Group(task=work.task, model=model, params=work.params)
            v.groups.append(group)
        group.add(work.rows(custom_id=custom_id, line=n))
        v.model = v.model or model
    if v.total == 0:
        v.errors = [{"code": "empty_file", "line": None, "param": "input_file_id",
                     "message": "the input file has no requests"}]
    return v


def _check_line(line: Any, *, endpoint: str,
                prepare: Prepare) -> tuple[str, openai_compat.Work]:
    if not isinstance(line, dict):
        raise BadRequest("a line is a JSON object {custom_id, method, url, body}")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
        raise BadRequest("custom_id: a non-empty string of at most 512 characters",
                         param="custom_id")
    if line.get("method", "POST") != "POST":
        raise BadRequest("method: POST", param="method")
    if line.get("url") != endpoint:
        raise BadRequest(f"url: this batch's endpoint is {endpoint} (got "
                         f"{str(line.get('url'))[:80]!r})", param="url",
                         code="mismatched_endpoint")
    body = line.get("body")
    if not isinstance(body, dict):
        raise BadRequest("body: the request body, a JSON object", param="body")
    return prepare(body)


# --- creating a batch --------------------------------------------------------------------

# Submits one group as a job (stored inputs, published) under an idempotency key; its id.
Submit = Callable[[Group, str], str]


def create(session: Session, *, tenant_id: str, input_file_id: str, endpoint: Any,
           completion_window: Any, metadata: Any, now: datetime | None = None) -> Batch:
    """Record a new batch, ``validating``, after checking the request's own fields."""
    if endpoint not in openai_compat.ENDPOINTS:
        raise BadRequest(f"endpoint: one of {', '.join(openai_compat.ENDPOINTS)}",
                         param="endpoint", code="unsupported_endpoint")
    if completion_window not in WINDOWS:
        raise BadRequest(f"completion_window: {', '.join(WINDOWS)}",
                         param="completion_window")
    if metadata is not None and not (
            isinstance(metadata, dict) and len(metadata) <= 16
            and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                    for k, v in metadata.items())):
        raise BadRequest("metadata: at most 16 string keys (64 characters) and string values "
                         "(512 characters)", param="metadata")
    now = now or utcnow()
    return jobs.create_batch(
        session, batch_id=new_batch_id(), tenant_id=tenant_id, endpoint=endpoint,
        input_file_id=input_file_id, completion_window=completion_window, metadata=metadata,
        expires_at=now + WINDOWS[completion_window], status="validating", now=now)


def start(session: Session, store: Store, *, batch: Batch, lines: Iterable[str],
          prepare: Prepare, submit: Submit, max_lines: int,
          now: datetime | None = None) -> Batch:
    """Validate the input file's lines and submit one job per group (each under an
    idempotency key made of the batch id, so that a retry submits nothing twice); the batch is
    then ``in_progress``, or ``failed`` with OpenAI's ``errors``."""
    v = validate_lines(lines, batch_id=batch.id, endpoint=batch.endpoint, prepare=prepare,
                       max_lines=max_lines)
    try:
        if v.errors:
            fail(session, batch_id=batch.id, errors=v.errors, now=now)
            return jobs.get_batch(session, batch_id=batch.id)
        key = None
        if v.invalid:
            key = openai_batch_files.invalid_key(batch.tenant_id, batch.id)
            store.put(key, b"".join(json.dumps(e, ensure_ascii=False).encode() + b"\n"
                                    for e in v.invalid), "application/jsonl")
        for i, group in enumerate(v.groups):
            job_id = submit(group, f"openai-batch:{batch.id}:{i}")
            jobs.add_batch_job(session, batch_id=batch.id, job_id=job_id)
    except Exception as exc:  # e.g. the store went away: no half-started batch stays behind
        session.rollback()
        code, message = (exc.code, exc.message) if isinstance(exc, LoomError) \
            else ("internal_error", "the batch could not be started")
        fail(session, batch_id=batch.id, now=now, errors=[
            {"code": code, "line": None, "param": None, "message": message}])
        _cancel_jobs(session, store, job_states(session, jobs.get_batch(
            session, batch_id=batch.id)), now=now or utcnow())
        raise
    finally:
        v.close()
    jobs.update_batch(session, batch_id=batch.id, statuses=("validating", "cancelling"), values={
        "request_total": v.total, "invalid_count": len(v.invalid), "invalid_key": key,
        "item_total": sum(g.items for g in v.groups), "model": v.model})
    if not jobs.update_batch(session, batch_id=batch.id, statuses=("validating",), values={
            "status": "in_progress", "in_progress_at": now or utcnow()}):
        # Cancelled while it was validating: what was just submitted is cancelled too.
        _cancel_jobs(session, store, job_states(session, jobs.get_batch(
            session, batch_id=batch.id)), now=now or utcnow())
    return refresh(session, store, batch_id=batch.id, now=now, write=False)


# --- reading and changing a batch --------------------------------------------------------


def job_states(session: Session, batch: Batch) -> dict[str, str]:
    return jobs.job_statuses(session, job_ids=list(batch.job_ids or []))


def refresh(session: Session, store: Store, *, batch_id: str, now: datetime | None = None,
            write: bool = True) -> Batch:
    """Bring the batch up to date: expire it when its window has passed, and (``write``)
    write its files and final status once every job is finished; without ``write`` it stops at
    ``finalizing`` (the API writes the files after its answer). Safe to call from anywhere,
    any number of times at once."""
    now = now or utcnow()
    batch = jobs.get_batch(session, batch_id=batch_id)
    if batch.status not in ("in_progress", "cancelling", "finalizing"):
        return batch
    states = job_states(session, batch)
    done = all(s in _TERMINAL for s in states.values())
    if not done and batch.status == "in_progress" and now >= batch.expires_at:
        if jobs.update_batch(session, batch_id=batch.id, statuses=("in_progress",),
                             values={"status": "finalizing", "finalizing_at": now,
                                     "expired_at": now}):
            _cancel_jobs(session, store, states, now=now)
        states = job_states(session, batch)
        done = all(s in _TERMINAL for s in states.values())
    if not done:
        return jobs.get_batch(session, batch_id=batch_id)
    jobs.update_batch(session, batch_id=batch.id, statuses=("in_progress",),
                      values={"status": "finalizing", "finalizing_at": now})
    batch = jobs.get_batch(session, batch_id=batch_id)
    if batch.status not in OPEN or not write:
        return batch
    written = openai_batch_files.write(session, store, batch)
    final = ("cancelled" if batch.cancelling_at else "expired" if batch.expired_at
             else "completed")
    jobs.update_batch(session, batch_id=batch.id, statuses=("cancelling", "finalizing"), values={
        "status": final, f"{final}_at": batch.expired_at if final == "expired" else now,
        "output_file_id": written.output_file_id, "error_file_id": written.error_file_id,
        "completed_count": written.completed, "failed_count": written.failed})
    return jobs.get_batch(session, batch_id=batch_id)


def cancel(session: Session, store: Store, *, batch_id: str, tenant_id: str,
           now: datetime | None = None, write: bool = False) -> Batch:
    """Cancel: queued items are cancelled at once, running ones finish or are cancelled by
    their workers; the batch is ``cancelling`` until then, ``cancelled`` once its files (what
    did finish, and an error line per line that did not) are written (by ``refresh``)."""
    now = now or utcnow()
    batch = jobs.get_batch(session, batch_id=batch_id, tenant_id=tenant_id)
    if batch.status in ("cancelling", "cancelled"):
        return batch
    if not jobs.update_batch(session, batch_id=batch.id, statuses=("validating", "in_progress"),
                             values={"status": "cancelling", "cancelling_at": now}):
        raise InvalidState(f"batch {batch_id} is {batch.status}; only a batch that is "
                           "validating or in progress can be cancelled")
    _cancel_jobs(session, store, job_states(session, batch), now=now)
    return refresh(session, store, batch_id=batch_id, now=now, write=write)


def _cancel_jobs(session: Session, store: Store, states: Mapping[str, str], *,
                 now: datetime) -> None:
    for job_id, status in states.items():
        if status in ("queued", "running"):
            try:
                jobs.cancel_job(session, job_id=job_id, store=store, now=now)
            except InvalidState:  # it finished meanwhile
                pass


def fail(session: Session, *, batch_id: str, errors: list[dict[str, Any]],
         now: datetime | None = None) -> bool:
    return jobs.update_batch(session, batch_id=batch_id, statuses=("validating",), values={
        "status": "failed", "failed_at": now or utcnow(), "errors": errors})


def tick(session: Session, store: Store, *, now: datetime | None = None) -> int:
    """The reconciler's pass over open batches: refresh each (expiry, files of finished ones),
    and fail a batch whose validation died with its request. Returns how many changed."""
    now = now or utcnow()
    changed = 0
    for batch_id in jobs.open_batch_ids(session, statuses=OPEN):
        try:
            changed += _tick_one(session, store, batch_id=batch_id, now=now)
        except Exception:  # one batch's trouble (its store objects) must not stop the others
            session.rollback()
            log.exception("refreshing batch %s failed", batch_id)
    return changed


def _tick_one(session: Session, store: Store, *, batch_id: str, now: datetime) -> int:
    batch = jobs.get_batch(session, batch_id=batch_id)
    before = batch.status  # (refresh re-reads the same row object)
    if before == "validating":
        if now - batch.created_at <= STALE_VALIDATION:
            return 0
        if not fail(session, batch_id=batch_id, now=now, errors=[{
                "code": "validation_interrupted", "line": None, "param": None,
                "message": "validation did not finish (the API stopped midway)"}]):
            return 0
        _cancel_jobs(session, store, job_states(session, batch), now=now)
        return 1
    if before == "finalizing" and batch.finalizing_at and not batch.expired_at \
            and now - batch.finalizing_at < WRITE_GRACE:
        return 0
    return int(refresh(session, store, batch_id=batch_id, now=now).status != before)


# --- the OpenAI batch object -------------------------------------------------------------


def request_counts(session: Session, batch: Batch) -> dict[str, int]:
    """Lines: exact once the batch is finished; while it runs, read from its items (a line
    of several items, embeddings or n images, counts as its share of them)."""
    if batch.completed_count is not None:
        return {"total": batch.request_total, "completed": batch.completed_count,
                "failed": batch.failed_count or 0}
    counts = jobs.item_counts(session, job_ids=list(batch.job_ids or []))
    lines = batch.request_total - batch.invalid_count
    scale = lines / batch.item_total if batch.item_total else 1.0
    ok = int(counts.get("succeeded", 0) * scale)
    bad = int((counts.get("failed", 0) + counts.get("cancelled", 0)) * scale)
    return {"total": batch.request_total, "completed": ok, "failed": batch.invalid_count + bad}


def batch_object(session: Session, batch: Batch) -> dict[str, Any]:
    """The OpenAI batch object, plus ``loom_job_ids`` (the jobs it runs as)."""
    return {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint,
        "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
        "status": batch.status, "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id, "model": batch.model,
        **{f"{name}_at": unix(getattr(batch, f"{name}_at")) for name in (
            "created", "in_progress", "expires", "finalizing", "completed", "failed",
            "expired", "cancelling", "cancelled")},
        "request_counts": request_counts(session, batch),
        "metadata": batch.batch_metadata or None,
        "loom_job_ids": list(batch.job_ids or []),
    }
