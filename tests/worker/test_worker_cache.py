"""The result cache with the real model on SQLite + a local store: a repeated input is not
inferred again, new weights or another tenant never reuse, and a job may opt out."""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import select

from worker_helpers import shape_png, tenant_id, upload_inputs

MODEL = "loom-shapes"


class Counting:
    """The real model, counting the images and prompts it is asked to run."""

    def __init__(self, model: Any, weights: str | None = None) -> None:
        self._model = model
        self.info = model.info if weights is None else dataclasses.replace(
            model.info, weights_sha256=weights)
        self.inferred = 0

    def caption(self, images: list[Any], **params: Any) -> list[str]:
        self.inferred += len(images)
        return self._model.caption(images, **params)  # type: ignore[no-any-return]

    def answer(self, images: list[Any], questions: list[str], **params: Any) -> list[str]:
        self.inferred += len(images)
        return self._model.answer(images, questions, **params)  # type: ignore[no-any-return]

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Any]:
        self.inferred += len(prompts)
        return self._model.generate(prompts, seeds)  # type: ignore[no-any-return]


def run(embedded: Any, model: Any, task: str, inputs: list[dict[str, Any]], *,
        tenant: str | None = None, use_cache: bool = True) -> tuple[Any, list[Any]]:
    from loom import jobs
    from loom.models import Output
    from worker.engine import Engine

    settings, sf, store = embedded
    with sf() as s:
        job = jobs.submit_job(
            s, tenant_id=tenant or tenant_id(sf), task=task, model_name=MODEL,
            items=[{"input": i, "metadata": None} for i in inputs], chunk_size=8,
            max_attempts=2, use_cache=use_cache)
    with Engine(settings, session_factory=sf, store=store, worker_id="w-cache",
                model_loader=lambda name: model) as engine:
        done = engine.run_job(job.id)
    with sf() as s:
        outs = sorted(s.scalars(select(Output).where(Output.job_id == job.id)),
                      key=lambda o: o.item_id)
    return done, outs


def test_caption_reuses_outputs_and_infers_duplicates_once(embedded: Any,
                                                           shapes_model: Any) -> None:
    _, sf, store = embedded
    tenant = tenant_id(sf)
    blobs = [shape_png(i) for i in range(5)] + [shape_png(2)]  # one input twice
    inputs = [{"image_key": k} for k in upload_inputs(store, tenant, blobs)]
    model = Counting(shapes_model)
    first, outs = run(embedded, model, "caption", inputs)
    assert first.status == "succeeded" and len(outs) == 6
    # The duplicate (item 5, in the second batch of 4) was inferred once: served from the
    # first batch's output once that batch had settled.
    assert model.inferred == 5
    assert all(o.cached_from is None and o.cache_key for o in outs[:5])
    assert outs[5].cached_from == outs[2].id and outs[5].text == outs[2].text

    # The same dataset again (uploaded anew: other keys, same bytes): no inference at all.
    again_inputs = [{"image_key": k} for k in upload_inputs(store, tenant, blobs)]
    model.inferred = 0
    second, again = run(embedded, model, "caption", again_inputs)
    assert second.status == "succeeded" and model.inferred == 0
    assert [o.text for o in again] == [o.text for o in outs]
    originals = {o.id for o in outs[:5]}
    assert all(o.cached_from in originals for o in again)
    assert {o.weights_sha256 for o in again} == {o.weights_sha256 for o in outs}

    from loom import exports

    with sf() as s:
        rows = list(exports.result_rows(s, job_id=second.id))
    assert all(r["cached"] and r["lineage"]["cached_from"] in originals for r in rows)

    # Opting out infers everything; new weights invalidate the cache; so does another tenant.
    model.inferred = 0
    run(embedded, model, "caption", again_inputs, use_cache=False)
    assert model.inferred == 6  # every item, the repeated one too (it is in another batch)
    retrained = Counting(shapes_model, weights="e" * 64)
    _, fresh = run(embedded, retrained, "caption", again_inputs)
    assert retrained.inferred == 5 and all(o.cached_from is None for o in fresh[:5])
    assert fresh[5].cached_from == fresh[2].id  # reused within the new weights' own outputs
    other = tenant_id(sf, "other")
    other_inputs = [{"image_key": k} for k in upload_inputs(store, other, blobs)]
    model.inferred = 0
    run(embedded, model, "caption", other_inputs, tenant=other)
    assert model.inferred == 5


def test_generate_cache_is_keyed_by_seed(embedded: Any, shapes_model: Any) -> None:
    model = Counting(shapes_model)
    prompt = "a small red circle"
    _, first = run(embedded, model, "generate", [{"prompt": prompt, "seed": s} for s in (1, 2)])
    assert model.inferred == 2
    model.inferred = 0
    _, again = run(embedded, model, "generate", [{"prompt": prompt, "seed": s} for s in (2, 3)])
    assert model.inferred == 1  # seed 2 was drawn before; seed 3 is new
    assert again[0].cached_from == first[1].id and again[0].storage_key == first[1].storage_key
    assert again[1].cached_from is None


def test_a_question_is_part_of_what_is_cached(embedded: Any, shapes_model: Any) -> None:
    """Two questions about one image are two answers, not one reused for the other."""
    _, sf, store = embedded
    (key,) = upload_inputs(store, tenant_id(sf), [shape_png(0)])
    model = Counting(shapes_model)
    questions = ["how many shapes are there?", "what shape is the red object?"]
    _, first = run(embedded, model, "vqa", [{"image_key": key, "question": q} for q in questions])
    assert model.inferred == 2 and first[0].cache_key != first[1].cache_key
    model.inferred = 0
    _, again = run(embedded, model, "vqa", [{"image_key": key, "question": questions[1]}])
    assert model.inferred == 0 and again[0].cached_from == first[1].id
    assert again[0].text == first[1].text
