"""What the /openai/v1 routes do, kept out of them: resolve a request's model, turn its body
into Loom work (``loom.openai_compat``, the one mapping), submit that work as a job through the
same path as ``POST /v1/jobs`` (stored inline inputs, outbox, publish), and for the synchronous
routes wait for the job and shape the reply (``loom.openai_replies``).

A synchronous request is a job of its own at priority 9 (the most urgent: Redis delivers it
first, and workers fill their batches with it first), so it does not wait behind a bulk job's
queue. The wait is cheap: one poll loop per API process asks the database for the status of
every job a request is waiting on, in one statement, every ``POLL_SECONDS``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import service
from api.deps import Runtime
from loom import jobs, openai_batches, openai_compat, openai_replies, tasks
from loom.errors import BadRequest, InvalidRequest, InvalidState, NotFound, WaitTimeout
from loom.models import JOB_TERMINAL, new_id

log = logging.getLogger("loom.api")

SYNC_PRIORITY = 9
POLL_SECONDS = 0.02
_TERMINAL = {s.value for s in JOB_TERMINAL}


def limits(rt: Runtime) -> openai_compat.Limits:
    s = rt.settings
    return openai_compat.Limits(max_text_chars=s.max_text_chars,
                                max_image_bytes=s.max_input_bytes,
                                max_items=s.max_items_per_request)


def resolve_model(session: Session, *, tenant_id: str,
                  name: str) -> tuple[str, tasks.ModelCaps, dict[str, Any]]:
    """(the model reference a job records, its capabilities, a named model's default params)
    for the ``model`` of a request: built in, a backend reference, one of the tenant's names
    (``loom models add``) or fine-tuned models, or one that a worker has run."""
    ref, defaults = jobs.resolve_alias(session, tenant_id=tenant_id, name=name, params={})
    caps = tasks.caps_for(ref, service.recorded_caps(session))
    if caps is None:
        found = jobs.resolve_model(session, tenant_id=tenant_id, ref=ref)
        if found is not None:
            ref = found.ref
            caps = jobs.registered_caps(session, tenant_id=tenant_id, ref=ref)
    session.rollback()  # end the reads
    if caps is None:
        raise NotFound(f"model {name!r} does not exist; see GET /models",
                       code="model_not_found")
    return ref, caps, defaults


def preparer(session: Session, rt: Runtime, *, tenant_id: str,
             endpoint: str) -> Callable[[dict[str, Any]], tuple[str, openai_compat.Work]]:
    """body -> (model reference, Work), each model resolved once (a batch has many lines)."""
    resolved: dict[str, tuple[str, tasks.ModelCaps, dict[str, Any]]] = {}
    bounds = limits(rt)

    def prepare(body: dict[str, Any]) -> tuple[str, openai_compat.Work]:
        name = openai_compat.request_model(body)
        if name not in resolved:
            resolved[name] = resolve_model(session, tenant_id=tenant_id, name=name)
        ref, caps, defaults = resolved[name]
        work = openai_compat.to_work(endpoint, body, model=name, caps=caps, limits=bounds)
        spec = tasks.get(work.task)
        # A named model's params (``loom models add --param``) under the request's own.
        params = {**{k: v for k, v in defaults.items() if spec.param(k)}, **work.params}
        try:
            tasks.check_model(spec, ref, caps, params)
        except InvalidRequest as exc:
            raise BadRequest(exc.message, param="model", code="unsupported_parameter") from None
        return ref, dataclasses.replace(work, params=params)

    return prepare


def submit_rows(session: Session, rt: Runtime, *, tenant_id: str, task: str, model: str,
                params: dict[str, Any], rows: Any, priority: int, metadata: dict[str, Any],
                idempotency_key: str | None = None) -> str:
    """Record a job of ``rows`` (({"input", "metadata"}, inline image | None)) and publish it,
    as ``POST /v1/jobs`` does; its id."""
    job = service.submit_storing_inputs(
        session, rt.store, job_id=new_id(), tenant_id=tenant_id, items=rows, task=task,
        model_name=model, params=params, priority=priority, metadata=metadata,
        idempotency_key=idempotency_key,
        request_hash=jobs.request_hash([idempotency_key, task, model, params])
        if idempotency_key else None,
        chunk_size=rt.settings.chunk_size, max_attempts=rt.settings.max_attempts,
        limits=jobs.Limits.from_settings(rt.settings),
        fast_lane_items=rt.settings.fast_lane_max_items)
    service.publish(session, rt, job.id)
    return job.id


# --- the synchronous routes ------------------------------------------------------------------


async def run(rt: Runtime, waiter: JobWaiter, *, tenant_id: str, endpoint: str,
              body: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
    """Serve one request as a job: (HTTP status, OpenAI body, job id)."""

    def submit() -> str:
        with rt.session_factory() as session:
            model, work = preparer(session, rt, tenant_id=tenant_id, endpoint=endpoint)(body)
            return submit_rows(session, rt, tenant_id=tenant_id, task=work.task, model=model,
                               params=work.params, rows=work.rows(), priority=SYNC_PRIORITY,
                               metadata={"openai": endpoint})

    job_id = await run_in_threadpool(submit)
    if await waiter.wait(job_id, timeout=rt.settings.openai_wait_seconds) is None:
        await run_in_threadpool(_give_up, rt, job_id)
        raise WaitTimeout(f"the request's job {job_id} did not finish within "
                          f"{rt.settings.openai_wait_seconds:g} s (LOOM_OPENAI_WAIT_SECONDS); "
                          "it was cancelled")

    def read() -> tuple[int, dict[str, Any]]:
        with rt.session_factory() as session:
            rows = list(jobs.iter_results(session, job_id=job_id))
        return openai_replies.reply(endpoint, openai_replies.load_results(rows, rt.store),
                                    reply_id=job_id)

    status, reply = await run_in_threadpool(read)
    return status, reply, job_id


def _give_up(rt: Runtime, job_id: str) -> None:
    with rt.session_factory() as session:
        try:
            jobs.cancel_job(session, job_id=job_id, store=rt.store)
        except InvalidState:  # it finished just now: nothing to cancel
            pass


class JobWaiter:
    """Waits for jobs to finish: one loop per event loop polls the status of every job that a
    request is waiting on, in one statement, and wakes those requests."""

    def __init__(self, session_factory: Any, interval: float = POLL_SECONDS) -> None:
        self.session_factory = session_factory
        self.interval = interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[str, list[asyncio.Future[str]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def wait(self, job_id: str, *, timeout: float) -> str | None:
        """The job's terminal status, or None after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a test client may run each request in a new loop
            self._loop, self._waiting, self._task = loop, {}, None
        future: asyncio.Future[str] = loop.create_future()
        self._waiting.setdefault(job_id, []).append(future)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._poll())
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            waiting = self._waiting.get(job_id, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._waiting.pop(job_id, None)

    async def _poll(self) -> None:
        # Ends as soon as nobody waits, with no await in between: a wait() that comes later
        # sees this task done and starts the next one.
        while self._waiting:
            try:
                found = await run_in_threadpool(self._statuses, list(self._waiting))
            except Exception:  # the database is briefly away: the requests time out at worst
                log.exception("polling job statuses failed")
                found = {}
            for job_id, status in found.items():
                if status in _TERMINAL:
                    for future in self._waiting.pop(job_id, []):
                        if not future.done():
                            future.set_result(status)
            await asyncio.sleep(self.interval)

    def _statuses(self, job_ids: list[str]) -> dict[str, str]:
        with self.session_factory() as session:
            return jobs.job_statuses(session, job_ids=job_ids)


# --- batches ---------------------------------------------------------------------------------


def start_batch(session: Session, rt: Runtime, *, tenant_id: str, batch: Any) -> Any:
    """Validate the batch's input file and submit its jobs (``openai_batches.start``)."""
    from loom import files

    source = files.get_file(session, file_id=batch.input_file_id, tenant_id=tenant_id)
    prepare = preparer(session, rt, tenant_id=tenant_id, endpoint=batch.endpoint)

    def submit(group: openai_batches.Group, key: str) -> str:
        return submit_rows(session, rt, tenant_id=tenant_id, task=group.task,
                           model=group.model, params=group.params, rows=group.rows(),
                           priority=0, idempotency_key=key,
                           metadata={"openai_batch": batch.id, "endpoint": batch.endpoint})

    lines = service.stream_lines(rt.store.open_stream(source.storage_key))
    return openai_batches.start(session, rt.store, batch=batch, lines=lines, prepare=prepare,
                                submit=submit, max_lines=rt.settings.openai_batch_max_lines)
