"""The result cache in the worker: items whose answer is already recorded are completed from it
with no inference (``loom.jobs.cache`` holds the key and the lookup)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from loom import jobs, tasks
from loom.errors import LoomError
from worker.model_info import info_field
from worker.outputs import Cached

if TYPE_CHECKING:  # pragma: no cover
    from worker.inference import ModelCache
    from worker.inputs import Prepared


class ResultCache:
    def __init__(self, session_factory: sessionmaker[Session], models: ModelCache) -> None:
        self.session_factory = session_factory
        self.models = models
        self._use: dict[str, bool] = {}
        # Keys this engine sent to the model whose results may not be committed yet: a later
        # batch asking the same settles them first, so one job infers each input once.
        self._pending: set[str] = set()

    def _uses_cache(self, job_id: str) -> bool:
        if job_id not in self._use:
            with self.session_factory() as session:
                self._use[job_id] = jobs.job_uses_cache(session, job_id=job_id)
        return self._use[job_id]

    def split(
        self, prepared: list[Prepared], settle: Callable[[], None] | None = None,
        job_id: str | None = None,
    ) -> tuple[list[tuple[Prepared, Any]], list[Prepared]]:
        """Key every good item (its output will answer that key later); -> (items served from
        the cache with their Cached output, the items left to infer or to fail). ``settle``
        waits for this engine's batches in flight (called only when this batch repeats one of
        their inputs). ``job_id``: the job whose cache setting the batch follows (a filled batch
        holds items of several jobs, all with that job's setting), by default the first item's."""
        good = [p for p in prepared if p.ok]
        if not good:
            return [], prepared
        first = good[0].item
        try:
            info = self.models.get(first.model_name, tenant_id=first.tenant_id).info
        except LoomError:
            return [], prepared  # infer reports the model's error on every item
        spec = tasks.get(first.task)
        params = spec.model_params(first.params)
        # Weights Loom does not hold (a remote endpoint) are keyed by what answers instead.
        weights = str(info_field(info, "weights_sha256", "")) or "unverified:{}:{}".format(
            info_field(info, "name", ""), info_field(info, "version", ""))
        for p in good:
            p.cache_key = jobs.cache_key(
                tenant_id=p.item.tenant_id, task=spec.name, model_name=first.model_name,
                weights_sha256=weights, params=params, input_sha256=p.input_sha256 or "",
                texts=p.texts, seed=p.seed)  # a sampling seed too, when the job has one
        if not self._uses_cache(job_id or first.job_id):
            return [], prepared
        if settle is not None and any(p.cache_key in self._pending for p in good):
            settle()
            self._pending.clear()  # settled: committed, or failed and not worth waiting for
        with self.session_factory() as session:
            hits = jobs.cached_outputs(session, keys=[p.cache_key for p in good if p.cache_key])
        served = [(p, Cached(hits[p.cache_key])) for p in good if p.cache_key in hits]
        taken = {id(p) for p, _ in served}
        if len(self._pending) > 100_000:
            self._pending.clear()
        self._pending.update(p.cache_key for p in good if id(p) not in taken and p.cache_key)
        return served, [p for p in prepared if id(p) not in taken]
