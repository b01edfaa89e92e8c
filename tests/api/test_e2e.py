"""End to end over HTTP: the API (uvicorn, in-process) on PostgreSQL + Redis + S3 (moto), and a
real ``celery -A worker.app worker`` subprocess with the real model."""

from __future__ import annotations

import csv
import hashlib
import http.server
import io
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from api_helpers import METRICS_TOKEN, Stack, b64, scene_png
from loom.client import ApiError

TIMEOUT = 240.0


def wait_job(stack: Stack, job_id: str, tenant: str = "alpha") -> dict[str, Any]:
    with stack.client(tenant) as c:
        try:
            return c.wait(job_id, poll_seconds=0.5, timeout=TIMEOUT)
        except TimeoutError:
            pytest.fail(f"{c.status(job_id)}\n{stack.worker.logs()}")


@pytest.fixture(scope="module")
def caption_job(stack: Stack) -> dict[str, Any]:
    """200 images captioned: submitted over HTTP, run by the worker process."""
    items = [{"image_base64": b64(scene_png(i)), "metadata": {"file": f"img{i:03d}.png"}}
             for i in range(200)]
    with stack.client() as c:
        job = c.submit("caption", items, idempotency_key="two-hundred")
    assert job["item_count"] == 200
    return wait_job(stack, job["id"])


def test_200_items_complete_with_results_in_every_format(
    stack: Stack, caption_job: dict[str, Any]
) -> None:
    job = caption_job
    assert job["status"] == "succeeded", job
    assert job["counts"]["succeeded"] == 200 and job["done"] == 200 and job["progress"] == 1.0
    assert job["finished_at"] and job["started_at"]
    with stack.client() as c:
        rows = list(c.result_rows(job["id"]))
        assert [r["index"] for r in rows] == list(range(200))
        assert all(r["status"] == "succeeded" and r["output"]["text"] for r in rows)
        assert rows[7]["metadata"] == {"file": "img007.png"}
        assert rows[0]["lineage"]["model"] == "loom-shapes" and rows[0]["lineage"]["worker_id"]
        table = list(csv.DictReader(io.StringIO(b"".join(c.results(job["id"], format="csv"))
                                                .decode())))
        assert len(table) == 200 and table[3]["file"] == "img003.png" and table[3]["text"]
        coco = json.loads(b"".join(c.results(job["id"], format="coco")))
        assert len(coco["images"]) == len(coco["annotations"]) == 200
        assert coco["images"][5]["file_name"] == "img005.png"
        assert {(im["width"], im["height"]) for im in coco["images"]} == {(64, 64)}
        assert coco["annotations"][5]["caption"] == rows[5]["output"]["text"]
        # Cursor pagination over items.
        page = c.items(job["id"], limit=150)
        rest = c.items(job["id"], limit=150, cursor=page["next_cursor"])
        assert len(page["items"]) == 150 and len(rest["items"]) == 50
        assert rest["next_cursor"] is None
        lineage = c.lineage(page["items"][0]["id"])
        digest = hashlib.sha256(scene_png(0)).hexdigest()
        assert lineage["output"]["input_sha256"] == digest
        assert lineage["output"]["weights_sha256"]
        # The same idempotency key and body: the same job, nothing re-run.
        again = c.submit("caption", [{"image_base64": b64(scene_png(i)),
                                      "metadata": {"file": f"img{i:03d}.png"}}
                                     for i in range(200)], idempotency_key="two-hundred")
        assert again["id"] == job["id"]
        assert any(m["versions"] for m in c.models() if m["name"] == "loom-shapes")


def test_generate_outputs_are_presigned_urls(stack: Stack) -> None:
    with stack.client() as c:
        job = c.submit("generate", [{"prompt": "a small red circle"},
                                    {"prompt": "a large blue square to the left of a small "
                                               "green triangle"}], params={"seed": 11})
        job = wait_job(stack, job["id"])
        assert job["status"] == "succeeded", job
        rows = list(c.result_rows(job["id"]))
        assert [r["lineage"]["seed"] for r in rows] == [11, 12]
        for r in rows:
            url = r["output"]["url"]
            assert url.startswith(stack.settings.s3_endpoint_url) and "Signature" in url
            png = httpx.get(url, timeout=30).content
            assert png.startswith(b"\x89PNG") and hashlib.sha256(png).hexdigest() == \
                r["output"]["sha256"]


def test_embed_job_vectors_and_dedupe(stack: Stack) -> None:
    """embed over HTTP: float32 .npy outputs in S3, then POST /v1/jobs/{id}/dedupe groups the
    byte-identical copy (sha256) and leaves distinct scenes alone."""
    import numpy as np

    pngs = [scene_png(300 + i) for i in range(4)]
    items = [{"image_base64": b64(p), "metadata": {"file": f"e{i}.png"}}
             for i, p in enumerate([*pngs, pngs[2]])]
    with stack.client() as c:
        job = wait_job(stack, c.submit("embed", items)["id"])
        assert job["status"] == "succeeded", job
        rows = list(c.result_rows(job["id"]))
        out = rows[0]["output"]
        assert out["kind"] == "vector" and out["content_type"] == "application/x-npy"
        vec = np.load(io.BytesIO(httpx.get(out["url"], timeout=30).content))
        assert vec.shape == (128,) and vec.dtype == np.float32
        answer = c.dedupe(job["id"])
        assert answer["vectors"] == 5 and answer["duplicates"] == 1 and answer["threshold"] == 0.9
        [group] = answer["groups"]
        assert [(m["file"], m["match"], m["keep"]) for m in group["members"]] == [
            ("e2.png", "first", True), ("e4.png", "exact", False)]
        captions = c.submit("caption", items[:1])
        with pytest.raises(ApiError) as ei:
            c.dedupe(captions["id"])
        assert ei.value.http_status == 422 and "embed job" in ei.value.message
    with stack.client("beta") as c, pytest.raises(ApiError) as ei:
        c.dedupe(job["id"])
    assert ei.value.http_status == 404


def test_concurrent_submissions_with_one_key_make_one_job(stack: Stack) -> None:
    body = {"task": "generate", "items": [{"prompt": "a small red circle", "seed": 5}]}
    headers = {**stack.headers(), "Idempotency-Key": "fifty-at-once"}

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{stack.url}/v1/jobs", json=body, headers=headers, timeout=60)

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(post, range(50)))
    assert {r.status_code for r in answers} == {201}, [r.text for r in answers if r.is_error]
    assert len({r.json()["id"] for r in answers}) == 1
    other = httpx.post(f"{stack.url}/v1/jobs", json={**body, "priority": 2}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    wait_job(stack, answers[0].json()["id"])


def test_other_tenants_see_nothing(stack: Stack, caption_job: dict[str, Any]) -> None:
    job_id = caption_job["id"]
    with stack.client("alpha") as a:
        item = a.items(job_id, limit=1)["items"][0]
        gen = a.submit("generate", [{"prompt": "a small red circle", "seed": 1}])
        wait_job(stack, gen["id"])
        output_id = a.items(gen["id"])["items"][0]["output"]["id"]
        assert a.output_content(output_id).startswith(b"\x89PNG")
    beta = stack.headers("beta")
    calls = [
        ("GET", f"/v1/jobs/{job_id}"), ("GET", f"/v1/jobs/{job_id}/items"),
        ("GET", f"/v1/jobs/{job_id}/results?format=jsonl"),
        ("GET", f"/v1/jobs/{job_id}/results?format=csv"),
        ("GET", f"/v1/jobs/{job_id}/results?format=coco"),
        ("POST", f"/v1/jobs/{job_id}/cancel"), ("POST", f"/v1/jobs/{job_id}/retry"),
        ("GET", f"/v1/items/{item['id']}/lineage"), ("GET", f"/v1/outputs/{output_id}/content"),
    ]
    for method, path in calls:
        r = httpx.request(method, stack.url + path, headers=beta, timeout=30)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "not_found"
    r = httpx.post(f"{stack.url}/v1/jobs", headers=beta, timeout=30, json={
        "task": "vqa", "parent_job_id": job_id,
        "items": [{"image_key": item["input"]["image_key"], "question": "what?"}]})
    assert r.status_code == 404, r.text
    listed = httpx.get(f"{stack.url}/v1/jobs", headers=beta, params={"limit": 500}).json()
    assert job_id not in {j["id"] for j in listed["jobs"]}
    assert httpx.get(f"{stack.url}/v1/jobs/{job_id}").status_code == 401


def test_failed_items_retry_and_cancel(stack: Stack) -> None:
    from loom.storage import input_key

    bad_key = input_key(stack.tenant_ids["alpha"], "uploads", 0, "png")
    stack.store.put(bad_key, b"\x89PNG\r\n\x1a\n-truncated", "image/png")
    with stack.client() as c:
        job = c.submit("vqa", [
            {"image_base64": b64(scene_png(1)), "question": "how many shapes are there?"},
            {"image_key": bad_key, "question": "how many shapes are there?"},
        ])
        job = wait_job(stack, job["id"])
        assert job["status"] == "completed_with_errors", job
        failed = c.items(job["id"], status="failed")["items"]
        assert [i["index"] for i in failed] == [1]
        assert failed[0]["error"]["code"] == "invalid_input"
        answer = c.retry(job["id"])
        assert answer["requeued"] == 1
        job = wait_job(stack, job["id"])
        assert job["status"] == "completed_with_errors" and job["counts"]["succeeded"] == 1
        big = c.submit("generate", [{"prompt": "a small red circle"}] * 120)
        cancelled = c.cancel(big["id"])
        assert cancelled["status"] in ("cancelling", "cancelled")
        final = wait_job(stack, big["id"])
        assert final["status"] == "cancelled" and final["counts"]["cancelled"] > 0
        assert c.cancel(big["id"])["status"] == "cancelled"  # again: a no-op
        with pytest.raises(ApiError) as exc:
            c.cancel(job["id"])  # finished
        assert exc.value.http_status == 409 and exc.value.code == "invalid_state"


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(scene_png(3))

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def local_http_server() -> Iterator[tuple[int, list[str]]]:
    _Recorder.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], _Recorder.hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_private_url_is_blocked_without_a_request(
    stack: Stack, local_http_server: tuple[int, list[str]]
) -> None:
    port, hits = local_http_server
    with stack.client() as c:
        job = c.submit("caption", [{"image_url": f"http://127.0.0.1:{port}/cat.png"}])
        job = wait_job(stack, job["id"])
        item = c.items(job["id"])["items"][0]
    assert item["status"] == "failed" and item["error"]["code"] == "blocked_url", item
    assert hits == []


def test_metrics_and_readiness(stack: Stack, caption_job: dict[str, Any]) -> None:
    assert httpx.get(f"{stack.url}/readyz").json()["checks"] == {
        "database": "ok", "broker": "ok", "storage": "ok"}
    assert httpx.get(f"{stack.url}/metrics", headers=stack.headers()).status_code == 401
    text = httpx.get(f"{stack.url}/metrics",
                     headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    assert values['loom_items{status="succeeded"}'] >= 200
    assert values['loom_jobs{status="succeeded"}'] >= 1
    assert "loom_queue_depth" in values
    assert values["loom_item_latency_seconds_count"] >= 200
    assert values['loom_item_latency_seconds_bucket{le="+Inf"}'] >= 200
    assert "loom_worker_items_per_second" in text


def test_remote_cli_commands(stack: Stack, tmp_path: Any) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    loom_bin = str(Path(sys.executable).parent / "loom")
    examples = Path(__file__).resolve().parents[2] / "examples" / "images"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env.update({"LOOM_API_URL": stack.url, "LOOM_API_KEY": stack.keys["alpha"],
                "LOOM_HOME": str(tmp_path / "home")})

    def loom(*args: str) -> str:
        proc = subprocess.run([loom_bin, *args], env=env, capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, f"loom {args}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout + proc.stderr

    out = loom("submit", "caption", str(examples / "scene_00.png"), str(examples / "scene_01.png"),
               "--wait")
    job_id = out.split("submitted job ")[1].split()[0]
    assert "succeeded" in out
    loom("results", job_id, "--format", "csv", "-o", str(tmp_path / "r.csv"))
    table = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert [r["file"] for r in table] == ["scene_00.png", "scene_01.png"]
    assert job_id in loom("jobs")
    assert "2/2 done" in loom("status", job_id)
    out = loom("submit", "generate", "a small red circle", "--seed", "3", "--variants", "2",
               "--wait")
    gen_id = out.split("submitted job ")[1].split()[0]
    rows = [json.loads(line) for line in loom("results", gen_id).splitlines()
            if line.startswith("{")]
    assert [r["lineage"]["seed"] for r in rows] == [3, 4]
    out = loom("submit", "ask", "--questions", str(examples / "expected.jsonl"), "--wait")
    assert "24 items" in out

    # A table in, its results over the API as Parquet: the user's columns first, under their
    # names and types (the int id, the image bytes as given), a failed row kept in place.
    import pyarrow as pa
    import pyarrow.parquet as pq

    pngs = [(examples / f"scene_0{i}.png").read_bytes() for i in range(3)]
    pngs[1] = b"no image at all"
    pq.write_table(pa.table({"uid": pa.array([7, 8, 9], pa.int64()), "img": pngs,
                             "status": ["mine"] * 3}), tmp_path / "t.parquet")
    out = loom("submit", "caption", str(tmp_path / "t.parquet"), "--image-col", "img",
               "--id-col", "uid", "--wait")
    table_id = out.split("submitted job ")[1].split()[0]
    loom("results", table_id, "--format", "parquet", "-o", str(tmp_path / "r.parquet"))
    got = pq.read_table(tmp_path / "r.parquet")
    assert got.schema.names[:3] == ["uid", "img", "status"]
    assert got.schema.field("uid").type == pa.int64()
    assert got.column("uid").to_pylist() == [7, 8, 9] and got.column("img").to_pylist() == pngs
    assert got.column("loom_status").to_pylist() == ["succeeded", "failed", "succeeded"]
    assert got.column("status").to_pylist() == ["mine"] * 3


def test_job_page_events_and_thumbnails_on_postgresql_and_s3(
    stack: Stack, caption_job: dict[str, Any]
) -> None:
    """The job page's reads on PostgreSQL, thumbnails read from S3 through the API, tenant-scoped
    (tests/api/test_job_page.py drives the page in a browser on SQLite)."""
    job_id = caption_job["id"]
    with stack.client() as c:
        events = list(c.events(job_id))
        item_id = c.items(job_id, limit=1)["items"][0]["id"]
    assert events[-1]["event"] == "finished" and events[-1]["data"]["done"] == 200
    for name, expected in (("alpha", 200), ("beta", 404)):
        with httpx.Client(base_url=stack.url, cookies={"loom_key": stack.keys[name]},
                          timeout=30) as web:
            page = web.get(f"/ui/jobs/{job_id}")
            thumb = web.get(f"/ui/items/{item_id}/thumb")
            data = web.get(f"/ui/jobs/{job_id}/data")
            stream = web.get(f"/v1/jobs/{job_id}/events")
        assert (page.status_code, thumb.status_code, data.status_code,
                stream.status_code) == (expected,) * 4, name
        if expected == 200:
            assert thumb.headers["content-type"] == "image/png"
            assert thumb.content.startswith(b"\x89PNG")
            assert "infer" in data.json()["stages"] and data.json()["throughput"]
            assert len(data.json()["samples"]) == 12
