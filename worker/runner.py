"""The runner (the engine's model stage): one batch of an inference task through the model.

Items whose answer is recorded already are served from the result cache; the rest are decoded
(when the I/O pool only read them) and run in one batched call of the method their task's spec
names. Runs on the model thread; what it returns goes to the finisher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker.inference import infer
from worker.inputs import Prepared, decode_input, prepare

if TYPE_CHECKING:  # pragma: no cover
    from loom.config import Settings
    from loom.storage import Store
    from worker.batches import Batch
    from worker.cache import ResultCache
    from worker.inference import ModelCache


@dataclass
class BatchOutput:
    """What a batch's model call produced: (item, output) pairs (cached outputs included), the
    items that failed before or in the call, the model's info for lineage, the call's time and
    how many items the call ran (the cached ones did not share its time)."""

    outputs: list[tuple[Prepared, Any]]
    bad: list[Prepared]
    info: Any
    infer_ms: float
    inferred: int = 0


class Runner:
    def __init__(self, settings: Settings, *, store: Store, models: ModelCache,
                 cache: ResultCache) -> None:
        self.settings = settings
        self.store = store
        self.models = models
        self.cache = cache

    def prepared(self, batch: Batch) -> list[Prepared]:
        """The batch's inputs: loaded by the I/O pool since the claim, or, for a suspect (run
        alone, nothing else in flight), read and decoded only now."""
        if batch.careful:
            return [prepare(item, settings=self.settings, store=self.store)
                    for item in batch.items]
        return [f.result() for f in batch.prepared]

    def run(self, prepared: list[Prepared], *, settle: Callable[[], None],
            job_id: str) -> BatchOutput:
        """``settle`` waits for the batches in flight (the cache calls it when this batch
        repeats one of their inputs); ``job_id``: the job whose cache setting applies."""
        served, prepared = self.cache.split(prepared, settle=settle, job_id=job_id)
        for p in prepared:  # those the I/O pool only read (the rest: no-op)
            decode_input(p, settings=self.settings)
        outputs, bad, info, infer_ms = infer(self.models, prepared)
        return BatchOutput(outputs + served, bad, info, infer_ms, inferred=len(outputs))
