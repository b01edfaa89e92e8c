"""The OpenAI-compatible API (/openai/v1) end to end, with the official `openai` SDK as the
client, against the real stack: the API (uvicorn) on PostgreSQL + Redis + S3 (moto) and a real
``celery -A worker.app worker`` running ``loom-shapes``. Scenes are rendered with known captions
and answers (``pipeline.data``), so what comes back is checked for being right."""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from api_helpers import Stack, scenes

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
TIMEOUT = 240.0
N_CANCEL = 2000  # generate lines: about 10 s of one CPU worker, cancelled after the first


def caption(scene: Any) -> str:
    from pipeline import data

    return data.caption(scene)


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_message(png: bytes, text: str | None = None) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(png)}}]
    if text is not None:
        parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def oai(stack: Stack) -> Any:
    return openai.OpenAI(base_url=f"{stack.url}/openai/v1", api_key=stack.keys["alpha"],
                         max_retries=0, timeout=TIMEOUT)


def wait_batch(oai: Any, stack: Stack, batch_id: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = oai.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        if time.monotonic() > deadline:
            pytest.fail(f"batch {batch_id} is {batch.status}\n{stack.worker.logs()}")
        time.sleep(0.3)


def file_lines(oai: Any, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in oai.files.content(file_id).text.splitlines()]


def test_chat_captions_a_data_url_image(oai: Any, stack: Stack) -> None:
    for png, scene in scenes(4, seed=11):
        raw = oai.chat.completions.with_raw_response.create(
            model="loom-shapes", messages=image_message(png, "Describe this image."),
            max_tokens=20)
        reply = raw.parse()
        assert reply.object == "chat.completion" and reply.model == "loom-shapes"
        [choice] = reply.choices
        assert choice.message.role == "assistant" and choice.finish_reason == "stop"
        assert choice.message.content == caption(scene)
        words = len(caption(scene).split())
        assert reply.usage.completion_tokens == words
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + words
    # The request was a job like any other: its page, lineage and priority.
    job_id = raw.headers["x-loom-job-id"]
    assert reply.id == f"chatcmpl-{job_id}"
    with stack.client() as c:
        job = c.status(job_id)
        assert job["task"] == "caption" and job["priority"] == 9 and job["params"] == {}
        assert job["metadata"] == {"openai": CHAT}
        [row] = list(c.result_rows(job_id))
        assert row["lineage"]["model"] == "loom-shapes" and row["output"]["text"] \
            == choice.message.content


def test_chat_with_a_question_is_vqa(oai: Any) -> None:
    from pipeline import data

    rng = random.Random(5)
    for png, scene in scenes(4, seed=12):
        question, answer = data.sample_question(scene, rng)
        reply = oai.chat.completions.create(model="loom-shapes",
                                            messages=image_message(png, question))
        assert reply.choices[0].message.content == answer, question


def test_chat_image_urls_pass_the_ssrf_guard(oai: Any) -> None:
    """An http(s) image URL is fetched by the worker through the SSRF guard, as an item's
    image_url is: a loopback address is refused there (a 400 naming blocked_url)."""
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/scene.png"}}]}]
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="loom-shapes", messages=messages)
    assert info.value.body["code"] == "blocked_url"
    assert info.value.body["type"] == "invalid_request_error"


def test_embeddings_of_images(oai: Any) -> None:
    import numpy as np

    (a, _), (b, _) = scenes(2, seed=13)
    reply = oai.embeddings.create(model="loom-shapes", input=[data_url(a), data_url(b),
                                                              data_url(a)])
    assert reply.object == "list" and reply.model == "loom-shapes"
    assert [d.index for d in reply.data] == [0, 1, 2]
    vecs = [np.asarray(d.embedding, dtype=np.float32) for d in reply.data]
    assert {v.shape for v in vecs} == {(128,)}
    assert all(abs(float(np.linalg.norm(v)) - 1.0) < 1e-4 for v in vecs)
    assert np.allclose(vecs[0], vecs[2]) and not np.allclose(vecs[0], vecs[1])
    floats = oai.embeddings.create(model="loom-shapes", input=data_url(a),
                                   encoding_format="float")
    assert np.allclose(floats.data[0].embedding, vecs[0], atol=1e-6)
    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(model="loom-shapes", input="a small red circle")
    assert info.value.body["code"] == "unsupported_input"


def test_images_generate_b64_pngs(oai: Any) -> None:
    reply = oai.images.generate(model="loom-shapes", prompt="a large blue square", n=2,
                                extra_body={"seed": 21})
    pngs = [base64.b64decode(d.b64_json) for d in reply.data]
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs)
    again = oai.images.generate(model="loom-shapes", prompt="a large blue square",
                                extra_body={"seed": 22})
    assert base64.b64decode(again.data[0].b64_json) == pngs[1]  # the same seed, the same image
    with pytest.raises(openai.BadRequestError) as info:
        oai.images.generate(model="loom-shapes", prompt="a blue square", size="1024x1024")
    assert info.value.body == {"message": info.value.body["message"],
                               "type": "invalid_request_error", "param": "size",
                               "code": "unsupported_parameter"}


def test_errors_have_openais_shape(oai: Any, stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="loom-shapes",
                                    messages=[{"role": "user", "content": "hello"}])
    assert set(info.value.body) == {"message", "type", "param", "code"}
    assert info.value.body["code"] == "image_required"
    bad = openai.OpenAI(base_url=f"{stack.url}/openai/v1", api_key="loom_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        bad.models.list()
    assert denied.value.body["type"] == "authentication_error"
    assert oai.models.list().data[0].id == "loom-shapes"


def test_batch_with_error_lines_runs_the_rest(oai: Any, stack: Stack) -> None:
    from pipeline import data

    truth = scenes(20, seed=14)
    rng = random.Random(9)
    lines = [json.dumps({"custom_id": f"cap-{i}", "method": "POST", "url": CHAT, "body": {
        "model": "loom-shapes", "messages": image_message(png)}}) for i, (png, _) in
        enumerate(truth)]
    question, answer = data.sample_question(truth[0][1], rng)
    lines.insert(5, json.dumps({"custom_id": "vqa-0", "method": "POST", "url": CHAT, "body": {
        "model": "loom-shapes", "messages": image_message(truth[0][0], question)}}))
    lines.insert(3, '{"custom_id": "broken", "method": "POST", "url": ')  # malformed
    lines.insert(9, json.dumps({"custom_id": "no-image", "method": "POST", "url": CHAT,
                                "body": {"model": "loom-shapes", "messages": [
                                    {"role": "user", "content": "describe it"}]}}))
    upload = oai.files.create(file=("requests.jsonl", "\n".join(lines).encode()),
                              purpose="batch")
    batch = oai.batches.create(input_file_id=upload.id, endpoint=CHAT,
                               completion_window="24h", metadata={"run": "e2e"})
    assert batch.status == "in_progress" and len(batch.model_extra["loom_job_ids"]) == 2
    done = wait_batch(oai, stack, batch.id)
    assert done.status == "completed" and done.completed_at and done.finalizing_at
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (23, 21, 2)
    out = file_lines(oai, done.output_file_id)
    assert len(out) == 21 and len({o["custom_id"] for o in out}) == 21
    got = {o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"]
           for o in out}
    assert got == {**{f"cap-{i}": caption(s) for i, (_, s) in enumerate(truth)},
                   "vqa-0": answer}
    assert {o["response"]["status_code"] for o in out} == {200} and out[0]["error"] is None
    assert out[0]["response"]["body"]["object"] == "chat.completion"
    errors = file_lines(oai, done.error_file_id)
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        (None, "invalid_json"), ("no-image", "image_required")]
    # Listed, paginated; its jobs are Loom jobs with pages and lineage.
    page = oai.batches.list(limit=1)
    assert [b.id for b in page.data] == [batch.id] and page.data[0].status == "completed"
    with stack.client() as c:
        for job_id in done.model_extra["loom_job_ids"]:
            job = c.status(job_id)
            assert job["status"] == "succeeded" and job["metadata"]["openai_batch"] == batch.id
        item = c.items(done.model_extra["loom_job_ids"][0], limit=1)["items"][0]
        assert item["metadata"]["custom_id"] == "cap-0" and c.lineage(item["id"])["output"]
    # The same file id, retrieved twice, is the same bytes (written once, idempotently).
    assert oai.files.content(done.output_file_id).content == \
        oai.files.content(done.output_file_id).content


def test_batch_cancel_keeps_what_finished(oai: Any, stack: Stack) -> None:
    lines = [json.dumps({"custom_id": f"g{i}", "method": "POST", "url": "/v1/images/generations",
                         "body": {"model": "loom-shapes", "prompt": "a small red circle",
                                  "seed": i}}) for i in range(N_CANCEL)]
    upload = oai.files.create(file=("gen.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = oai.batches.create(input_file_id=upload.id, endpoint="/v1/images/generations",
                               completion_window="24h")
    deadline = time.monotonic() + TIMEOUT
    while oai.batches.retrieve(batch.id).request_counts.completed == 0:  # a few finish first
        assert time.monotonic() < deadline, stack.worker.logs()
        time.sleep(0.05)
    cancelling = oai.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait_batch(oai, stack, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    out, errors = file_lines(oai, done.output_file_id), file_lines(oai, done.error_file_id)
    ids = [x["custom_id"] for x in out + errors]
    assert sorted(ids) == sorted(f"g{i}" for i in range(N_CANCEL))  # each line exactly once
    assert out and errors and {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    for o in out:
        png = base64.b64decode(o["response"]["body"]["data"][0]["b64_json"])
        assert png.startswith(b"\x89PNG")
    assert (done.request_counts.completed, done.request_counts.failed) == (len(out),
                                                                          len(errors))


@pytest.mark.timeout(600)
def test_500_images_through_a_batch_with_only_the_openai_sdk(stack: Stack,
                                                             tmp_path: Path) -> None:
    """Done when: the README's script (examples/openai_batch.py, only the `openai` SDK) runs
    500 images through a Loom batch and gets every caption right in the output file."""
    script = (ROOT / "examples" / "openai_batch.py").read_text()
    assert script.split('"""', 2)[2].strip() in (ROOT / "README.md").read_text()
    rows = []
    for i, (png, scene) in enumerate(scenes(500, seed=2027)):
        (tmp_path / f"s{i:03d}.png").write_bytes(png)
        rows.append({"file": f"s{i:03d}.png", "expected_caption": caption(scene)})
    (tmp_path / "expected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {"PATH": "/usr/bin:/bin", "OPENAI_BASE_URL": f"{stack.url}/openai/v1",
           "OPENAI_API_KEY": stack.keys["beta"]}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "openai_batch.py"),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=540, check=False)
    print(f"\n[openai batch] 500 images in {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "500/500 captions right" in proc.stdout
    # And on the bundled examples, as the README shows.
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "openai_batch.py"),
                           str(ROOT / "examples" / "images")], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "24/24 captions right" in proc.stdout, proc.stdout[-2000:]
