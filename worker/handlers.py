"""Handlers of tasks that do not run in batched model calls (a spec whose ``handler`` is not
"infer", loom/tasks.py): each item runs alone on the model thread, nothing else in flight, while
the lease keeper heartbeats its lease.

``HANDLERS`` maps a spec's handler name to the class that runs its items; the engine builds one
of each and dispatches by the item's task, so it names no task itself. A new task of this kind
is its spec, its model code and one handler here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from loom import jobs
from loom.errors import LoomError, ModelError
from worker.batches import Batch, ChunkReport, Progress, Scope, StageParts
from worker.outages import is_outage

if TYPE_CHECKING:  # pragma: no cover
    from loom.jobs import ClaimedItem, ItemFailure, ItemResult
    from worker.inference import ModelCache
    from worker.webhook_sender import WebhookSender

log = logging.getLogger("worker.engine")


@dataclass(frozen=True)
class HandlerContext:
    """What a handler may use: the engine's shared parts, its models, its webhook sender, and
    the clean-stop flag it polls."""

    parts: StageParts
    models: ModelCache
    webhooks: WebhookSender
    should_stop: Callable[[], bool]


class Handler(Protocol):
    def run(self, batch: Batch, scope: Scope, report: ChunkReport,
            progress: Progress | None) -> None: ...


class FinetuneHandler:
    """A finetune job's one item (worker.finetune). Stopped between steps: a cancel request
    cancels it, a clean stop (Ctrl-C) gives its lease back for the next run."""

    def __init__(self, ctx: HandlerContext) -> None:
        self.ctx = ctx

    def _train(self, item: ClaimedItem) -> ItemResult | None:
        from worker.finetune import run_finetune

        c, p = self.ctx, self.ctx.parts
        return run_finetune(item, settings=p.settings, session_factory=p.session_factory,
                            store=p.store, models=c.models, should_stop=c.should_stop)

    def run(self, batch: Batch, scope: Scope, report: ChunkReport,
            progress: Progress | None) -> None:
        c, p = self.ctx, self.ctx.parts
        for item in batch.items:
            result: ItemResult | None = None
            failure: ItemFailure | None = None
            try:
                result = self._train(item)
            except Exception as exc:
                if is_outage(exc):
                    raise  # run_chunk gives the lease back, attempt excused
                err = exc if isinstance(exc, LoomError) else ModelError(
                    f"finetune failed: {type(exc).__name__}: {exc}")
                log.warning("finetune %s failed: %s", item.job_id, err)
                failure = jobs.ItemFailure(item_id=item.id, error=err, attempt=item.attempts)
            ending = p.leases.ending([item.id])
            with p.session_factory() as session:
                if result is not None:
                    won = jobs.complete_items(session, worker_id=p.worker_id, results=[result],
                                              store=p.store, on_finalized=c.webhooks.finalized,
                                              end_leases=ending)
                    report.succeeded += won
                    report.fenced += 1 - won
                elif failure is not None:
                    jobs.fail_items(session, worker_id=p.worker_id, failures=[failure],
                                    backoff_seconds=p.settings.retry_backoff_seconds,
                                    store=p.store, on_finalized=c.webhooks.finalized)
                    if p.facts.final(item, failure.error):
                        report.failed += 1
                    else:
                        report.retried += 1
                elif jobs.job_status(session, job_id=item.job_id) in ("cancelling", "cancelled"):
                    scope.cancelling = True
                else:
                    jobs.release_leases(session, worker_id=p.worker_id, item_ids=[item.id])
                if result is None:
                    jobs.end_leases(session, worker_id=p.worker_id, lease_ids=ending)
            p.leases.discard([item.id])
            report.batches += 1
            final = result is not None or (
                failure is not None and p.facts.final(item, failure.error))
            if progress is not None and final:
                progress(1)


HANDLERS: dict[str, Callable[[HandlerContext], Handler]] = {"finetune": FinetuneHandler}
