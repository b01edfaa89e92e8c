"""The OpenAI-compatible API embedded (``local_app``: SQLite, a local store, no broker), with the
official `openai` SDK as the client: files, batch validation, cancel and expiry, OpenAI's error
shape. The jobs a batch makes are real jobs; with no worker here, a test finishes items through
``loom.jobs`` itself where it needs finished results."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

import pytest
from api_helpers import LocalApp, scene_png

openai = pytest.importorskip("openai")

CHAT = "/v1/chat/completions"


@pytest.fixture
def oai(local_app: LocalApp) -> Any:
    return openai.OpenAI(base_url="http://testserver/openai/v1", api_key="unused",
                         http_client=local_app.client, max_retries=0)


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def chat_line(custom_id: str, text: str | None = "Describe.", *, i: int = 0,
              url: str | None = None) -> str:
    parts: list[dict[str, Any]] = [] if url == "" else [
        {"type": "image_url", "image_url": {"url": url or data_url(scene_png(i, size=32))}}]
    if text:
        parts.append({"type": "text", "text": text})
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT, "body": {
        "model": "loom-shapes", "messages": [{"role": "user", "content": parts}]}})


def upload(oai: Any, lines: list[str]) -> Any:
    return oai.files.create(file=("in.jsonl", "\n".join(lines).encode()), purpose="batch")


def lines_of(oai: Any, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in oai.files.content(file_id).text.splitlines()]


def test_files_create_retrieve_content_list_delete(oai: Any) -> None:
    body = b'{"custom_id": "a"}\n'
    f = oai.files.create(file=("requests.jsonl", body), purpose="batch")
    assert (f.object, f.purpose, f.bytes, f.filename) == ("file", "batch", len(body),
                                                          "requests.jsonl")
    assert f.id.startswith("file-") and f.created_at > 0
    assert oai.files.retrieve(f.id).id == f.id
    assert oai.files.content(f.id).content == body
    g = oai.files.create(file=("b.jsonl", b"{}\n"), purpose="batch")
    page = oai.files.list(limit=1)
    assert [x.id for x in page.data] == [g.id] and page.has_more
    assert [x.id for x in oai.files.list(limit=1, after=g.id).data] == [f.id]
    assert oai.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(f.id)
    with pytest.raises(openai.BadRequestError) as info:
        oai.files.create(file=("x.jsonl", body), purpose="fine-tune")
    assert info.value.body["param"] == "purpose"


def test_a_file_over_the_limit_is_413(local_app: LocalApp, oai: Any) -> None:
    local_app.app.state.runtime.settings.openai_file_max_bytes = 100
    with pytest.raises(openai.APIStatusError) as info:
        oai.files.create(file=("big.jsonl", b"x" * 101), purpose="batch")
    assert info.value.status_code == 413
    assert info.value.body["type"] == "invalid_request_error"


def test_invalid_lines_go_to_the_error_file_and_the_rest_run(local_app: LocalApp,
                                                             oai: Any) -> None:
    lines = [chat_line("c0", i=0), "{not json", chat_line("q1", "what color is the circle?"),
             json.dumps({"custom_id": "u", "method": "POST", "url": "/v1/embeddings",
                         "body": {}}),
             chat_line("noimg", "hello", url=""), "", chat_line("c1", i=1),
             json.dumps({"custom_id": "m", "method": "POST", "url": CHAT,
                         "body": {"model": "nope", "messages": []}})]
    batch = oai.batches.create(input_file_id=upload(oai, lines).id, endpoint=CHAT,
                               completion_window="24h", metadata={"project": "p1"})
    assert batch.status == "in_progress" and batch.in_progress_at and batch.expires_at
    assert batch.expires_at - batch.created_at == 24 * 3600
    assert batch.metadata == {"project": "p1"} and batch.model == "loom-shapes"
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (7, 0, 4)
    # Two jobs: the captions, and the question (vqa); published like any job.
    jobs_ = batch.model_extra["loom_job_ids"]
    assert len(jobs_) == 2 and {c.job_id for c in local_app.published} == set(jobs_)
    listed = local_app.client.get("/v1/jobs").json()["jobs"]
    assert {j["task"] for j in listed} == {"caption", "vqa"}
    assert {j["metadata"]["openai_batch"] for j in listed} == {batch.id}
    # Cancelled before any worker ran: every valid line is an error line, once each.
    cancelled = oai.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    done = oai.batches.retrieve(batch.id)
    assert done.status == "cancelled" and done.cancelled_at and done.output_file_id is None
    errors = lines_of(oai, done.error_file_id)
    assert [e["custom_id"] for e in errors] == ["c0", None, "q1", "u", "noimg", "c1", "m"]
    by_id = {e["custom_id"]: e["error"]["code"] for e in errors}
    assert by_id == {"c0": "batch_cancelled", None: "invalid_json", "q1": "batch_cancelled",
                     "u": "mismatched_endpoint", "noimg": "image_required",
                     "c1": "batch_cancelled", "m": "model_not_found"}
    assert all(e["response"] is None for e in errors)
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (7, 0, 7)
    assert oai.batches.cancel(batch.id).status == "cancelled"  # again: a no-op
    finished = oai.batches.create(input_file_id=upload(oai, ["{"]).id, endpoint=CHAT,
                                  completion_window="24h")  # only an invalid line: done
    assert oai.batches.retrieve(finished.id).status == "completed"
    with pytest.raises(openai.ConflictError):
        oai.batches.cancel(finished.id)


def test_duplicate_custom_ids_fail_the_batch(oai: Any) -> None:
    lines = [chat_line("a"), chat_line("b"), chat_line("a"), chat_line("b")]
    batch = oai.batches.create(input_file_id=upload(oai, lines).id, endpoint=CHAT,
                               completion_window="24h")
    assert batch.status == "failed" and batch.failed_at
    assert [(e.code, e.line, e.param) for e in batch.errors.data] == [
        ("duplicate_custom_id", 3, "custom_id"), ("duplicate_custom_id", 4, "custom_id")]
    assert batch.model_extra["loom_job_ids"] == []  # nothing was submitted
    empty = oai.batches.create(input_file_id=upload(oai, ["", " "]).id, endpoint=CHAT,
                               completion_window="24h")
    assert empty.status == "failed" and empty.errors.data[0].code == "empty_file"
    # Newest first, a page at a time (``after`` = the last id of the page before).
    page = oai.batches.list(limit=1)
    assert [b.id for b in page.data] == [empty.id] and page.has_more
    assert [b.id for b in oai.batches.list(limit=1, after=empty.id).data] == [batch.id]
    assert [b.id for b in oai.batches.list(limit=1)] == [empty.id, batch.id]  # SDK pages on


def test_too_many_lines_fail_the_batch(local_app: LocalApp, oai: Any) -> None:
    local_app.app.state.runtime.settings.openai_batch_max_lines = 2
    batch = oai.batches.create(input_file_id=upload(oai, [chat_line(f"r{i}") for i in range(3)]).id,
                               endpoint=CHAT, completion_window="24h")
    assert batch.status == "failed" and batch.errors.data[0].code == "too_many_requests"


def test_batch_requests_that_are_refused_before_anything_runs(oai: Any) -> None:
    f = upload(oai, [chat_line("a")])
    for kwargs, param in (({"completion_window": "1h"}, "completion_window"),
                          ({"endpoint": "/v1/completions"}, "endpoint"),
                          ({"metadata": {"k": 1}}, "metadata")):
        args = {"input_file_id": f.id, "endpoint": CHAT, "completion_window": "24h", **kwargs}
        with pytest.raises(openai.BadRequestError) as info:
            oai.batches.create(**args)
        assert info.value.body["param"] == param
    with pytest.raises(openai.NotFoundError):
        oai.batches.create(input_file_id="file-missing", endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        oai.batches.retrieve("batch_missing")
    page = oai.batches.list(limit=5)
    assert page.data == [] and not page.has_more


def test_an_expired_batch_keeps_its_finished_results(local_app: LocalApp, oai: Any) -> None:
    """Past its window, the reconciler's tick expires the batch: open items are cancelled,
    finished lines stay in the output file, the others are batch_expired error lines."""
    from loom import jobs, openai_batches
    from loom.models import utcnow

    lines = [chat_line(f"r{i}", i=i) for i in range(4)]
    batch = oai.batches.create(input_file_id=upload(oai, lines).id, endpoint=CHAT,
                               completion_window="24h")
    [job_id] = batch.model_extra["loom_job_ids"]
    rt = local_app.app.state.runtime
    with local_app.session_factory() as s:  # a worker finishes the first two lines
        claimed = jobs.claim_items(s, job_id=job_id, start=0, end=2, worker_id="w", limit=2,
                                   lease_seconds=60)
        jobs.complete_items(s, worker_id="w", results=[
            jobs.ItemResult(item_id=c.id, kind="text", text=f"caption {c.index}",
                            attempt=c.attempts) for c in claimed])
        assert openai_batches.tick(s, rt.store) == 0  # within its window: nothing to do
        assert openai_batches.tick(s, rt.store, now=utcnow() + timedelta(hours=25)) == 1
    done = oai.batches.retrieve(batch.id)
    assert done.status == "expired" and done.expired_at and done.finalizing_at
    out = lines_of(oai, done.output_file_id)
    assert [(o["custom_id"], o["response"]["body"]["choices"][0]["message"]["content"])
            for o in out] == [("r0", "caption 0"), ("r1", "caption 1")]
    assert out[0]["response"]["status_code"] == 200
    assert [(e["custom_id"], e["error"]["code"]) for e in lines_of(oai, done.error_file_id)] \
        == [("r2", "batch_expired"), ("r3", "batch_expired")]
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 2)


def test_synchronous_refusals_have_openais_error_shape(local_app: LocalApp, oai: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="loom-shapes",
                                    messages=[{"role": "user", "content": "hello"}])
    assert info.value.body["code"] == "image_required"
    raw = local_app.client.post("/openai/v1/embeddings",
                                json={"model": "loom-shapes", "input": "a red circle"})
    assert raw.status_code == 400
    assert raw.json() == {"error": {
        "message": raw.json()["error"]["message"], "type": "invalid_request_error",
        "param": "input", "code": "unsupported_input"}}
    assert "embeds images, not text" in raw.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        oai.images.generate(model="no-such-model", prompt="a red circle")
    assert missing.value.body["code"] == "model_not_found"
    assert local_app.client.post("/openai/v1/chat/completions", content=b"[1]",
                                 headers={"content-type": "application/json"}).status_code == 400
    assert local_app.client.get("/openai/v1/nowhere").json()["error"]["type"] \
        == "invalid_request_error"
    assert local_app.published == []  # nothing was submitted
    assert [m.id for m in oai.models.list().data] == ["loom-shapes"]
    assert oai.models.retrieve("loom-shapes").owned_by == "loom"


def test_an_unexpected_error_is_openais_500(local_app: LocalApp, oai: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from api.routes import openai_sync

    def broken(models: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(openai_sync, "model_list", broken)
    with pytest.raises(openai.InternalServerError) as info:
        oai.models.list()
    assert info.value.body == {"message": "internal server error", "type": "server_error",
                               "param": None, "code": "internal_error"}
    assert oai.files.list().data == []  # the same connection serves the next request
