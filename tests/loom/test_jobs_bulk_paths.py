"""The bulk paths behave like the row-by-row ones, on SQLite and PostgreSQL (db_url): COPY-built
submissions keep every input byte; set-based claim and completion record the same lineage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from jobs_helpers import claim, events, ok
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from loom import jobs
from loom.jobs import ItemResult
from loom.models import Item, Job, Output

AWKWARD: list[dict[str, Any]] = [
    {"input": {"prompt": "back\\slash \\N and \\t literally"}, "metadata": {"file": "a\\b.png"}},
    {"input": {"prompt": "tab\there, newline\nthere, cr\rhere"}, "metadata": None},
    {"input": {"prompt": 'quotes " and \' and {braces} [x]'}, "metadata": {"n": [1, 2.5, None]}},
    {"input": {"prompt": "unicode é ß 日本 🙂", "seed": 2**40}, "metadata": {"k": {"nested": True}}},
    {"input": {}, "metadata": {}},
]


def test_submit_keeps_awkward_inputs_and_metadata_exactly(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(len(AWKWARD), task="generate", items=AWKWARD)
    page = jobs.list_items(session, job_id=job.id)
    assert [(i.index, i.input, i.item_metadata) for i in page.items] == [
        (n, spec["input"], spec["metadata"]) for n, spec in enumerate(AWKWARD)
    ]
    claimed = claim(session, job, "w")
    assert [c.input for c in claimed] == [spec["input"] for spec in AWKWARD]


def test_completion_records_the_full_lineage(
    session: Session, make_job: Callable[..., Job]
) -> None:
    job = make_job(2, params={"beam": 3, "note": "x\\y"})
    a, b = claim(session, job, "w1")
    assert a.params == {"beam": 3, "note": "x\\y"} and a.tenant_id == job.tenant_id
    results = [
        ItemResult(a.id, "image", storage_key="t/jobs/j/outputs/00000000.png",
                   content_type="image/png", sha256="c" * 64, size_bytes=1234,
                   input_sha256="d" * 64, model_version="7", weights_sha256="e" * 64, seed=99,
                   timings={"infer_ms": 0.5, "upload_ms": 0.25}, attempt=a.attempts),
        ItemResult(b.id, "text", text="two", model_name="other-model", cache_key="k" * 64,
                   attempt=b.attempts),
    ]
    assert jobs.complete_items(session, worker_id="w1", results=results) == 2
    session.commit()
    out_a = session.scalar(select(Output).where(Output.item_id == a.id))
    out_b = session.scalar(select(Output).where(Output.item_id == b.id))
    assert out_a is not None and out_b is not None
    assert (out_a.kind, out_a.text, out_a.storage_key, out_a.content_type) == (
        "image", None, "t/jobs/j/outputs/00000000.png", "image/png")
    assert (out_a.sha256, out_a.size_bytes, out_a.input_sha256, out_a.seed) == (
        "c" * 64, 1234, "d" * 64, 99)
    assert (out_a.model_name, out_a.model_version, out_a.weights_sha256) == (
        "loom-shapes", "7", "e" * 64)  # model_name None -> the job's
    assert (out_a.task, out_a.params, out_a.attempt, out_a.worker_id, out_a.job_id) == (
        "caption", {"beam": 3, "note": "x\\y"}, 1, "w1", job.id)
    assert out_a.timings == {"infer_ms": 0.5, "upload_ms": 0.25}
    assert (out_b.kind, out_b.text, out_b.model_name, out_b.timings) == (
        "text", "two", "other-model", {})
    assert (out_a.cache_key, out_b.cache_key, out_b.cached_from) == (None, "k" * 64, None)
    # The output row is the record of the success (no event row); the lineage shows it as the
    # item's 'succeeded' event, after its claim.
    assert events(session, job, "succeeded") == 0
    history = {i.id: jobs.item_lineage(session, item_id=i.id)["events"] for i in (a, b)}
    assert [e["kind"] for e in history[a.id]] == ["claimed", "succeeded"]
    done_a, done_b = history[a.id][1], history[b.id][1]
    assert done_a["duration_ms"] == 750.0 and done_b["duration_ms"] is None
    assert (done_a["attempt"], done_a["worker_id"], done_a["created_at"]) == (
        1, "w1", out_a.created_at)
    # The claim wrote no event row either: the output records when its attempt was claimed.
    assert events(session, job, "claimed") == 0
    item_a = session.get(Item, a.id)
    assert item_a is not None and out_a.claimed_at == item_a.started_at is not None
    for i in (a, b):
        claim_event = history[i.id][0]
        assert (claim_event["attempt"], claim_event["worker_id"]) == (1, "w1")
    assert history[a.id][0]["created_at"] == out_a.claimed_at
    assert jobs.get_job(session, job_id=job.id).status == "succeeded"


def test_one_completion_spanning_two_jobs_finalises_both(
    session: Session, make_job: Callable[..., Job]
) -> None:
    first, second = make_job(2), make_job(3)
    batch = claim(session, first, "w") + claim(session, second, "w")
    assert jobs.complete_items(session, worker_id="w", results=[ok(c) for c in batch]) == 5
    assert jobs.get_job(session, job_id=first.id).status == "succeeded"
    assert jobs.get_job(session, job_id=second.id).status == "succeeded"
    assert events(session, first, "finalized") == 1 and events(session, second, "finalized") == 1


def test_partial_fence_in_one_batch(session: Session, make_job: Callable[..., Job]) -> None:
    """One statement decides per row: rows still leased to the caller win, others are skipped
    and get neither an output nor an event."""
    job = make_job(3)
    mine = claim(session, job, "w1")
    stale = ok(mine[1])
    stale.attempt = mine[1].attempts + 1  # a claim this worker never made
    results = [ok(mine[0]), stale, ok(mine[2])]
    assert jobs.complete_items(session, worker_id="w1", results=results) == 2
    session.commit()
    have = set(session.scalars(select(Output.item_id).where(Output.job_id == job.id)))
    assert have == {mine[0].id, mine[2].id}
    lost = jobs.item_lineage(session, item_id=mine[1].id)["events"]
    assert [e["kind"] for e in lost] == ["claimed"]
    assert jobs.get_job(session, job_id=job.id).status == "running"


def test_submit_streams_a_generator_and_rolls_back_a_broken_one(
    session: Session, tenant_id: str
) -> None:
    """Items may be a generator (a million-row table): counted as they are inserted, batch by
    batch, with one outbox row per chunk; one that raises midway leaves no job behind."""
    from loom.errors import InvalidRequest
    from loom.jobs import submit as submit_mod
    from loom.models import Item, Outbox

    n = submit_mod._INSERT_BATCH * 2 + 3  # three insert batches, the last a partial one
    job = jobs.submit_job(
        session, tenant_id=tenant_id, task="caption", model_name="loom-shapes", chunk_size=64,
        max_attempts=3,
        items=({"input": {"image_key": f"k/{i}.png"}, "metadata": {"row": i}} for i in range(n)))
    assert job.item_count == n
    assert session.scalar(select(Job.item_count).where(Job.id == job.id)) == n
    rows = session.execute(select(Item.index, Item.item_metadata).where(Item.job_id == job.id)
                           .order_by(Item.index)).all()
    assert [(r.index, r.item_metadata["row"]) for r in rows] == [(i, i) for i in range(n)]
    spans = session.execute(select(Outbox.chunk_start, Outbox.chunk_end)
                            .where(Outbox.job_id == job.id).order_by(Outbox.chunk_start)).all()
    assert spans[0] == (0, 64) and spans[-1] == (n - n % 64, n) and len(spans) == -(-n // 64)

    def broken() -> Any:
        for i in range(submit_mod._INSERT_BATCH + 10):
            yield {"input": {"image_key": f"k/{i}.png"}}
        raise InvalidRequest("manifest line 10011: not JSON")

    with pytest.raises(InvalidRequest, match="10011"):
        jobs.submit_job(session, tenant_id=tenant_id, task="caption", model_name="loom-shapes",
                        chunk_size=64, max_attempts=3, items=broken())
    assert session.scalar(select(func.count()).select_from(Job)) == 1
    assert session.scalar(select(func.count()).select_from(Item)) == n
    with pytest.raises(InvalidRequest, match="at least one item"):
        jobs.submit_job(session, tenant_id=tenant_id, task="caption", model_name="loom-shapes",
                        chunk_size=64, max_attempts=3, items=iter(()))
    assert session.scalar(select(func.count()).select_from(Job)) == 1
