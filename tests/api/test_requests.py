"""Request handling without workers: validation, limits, auth, uploads, manifests, idempotency,
readiness, and the API's imports. SQLite + local store; publishing goes into a list."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from api_helpers import LocalApp, b64, scene_png

ROOT = Path(__file__).resolve().parents[2]


def error(response: Any, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return str(body["error"]["message"])


def test_submit_stores_base64_and_publishes(local_app: LocalApp) -> None:
    c = local_app.client
    r = c.post("/v1/jobs", json={"task": "caption", "items": [
        {"image_base64": b64(scene_png(1)), "metadata": {"file": "a.png"}},
        {"image_url": "https://example.com/b.png"},
    ]})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["item_count"] == 2 and job["status"] == "queued"
    assert job["counts"]["queued"] == 2 and job["progress"] == 0.0
    assert [(ch.job_id, ch.start, ch.end) for ch in local_app.published] == [(job["id"], 0, 2)]
    items = c.get(f"/v1/jobs/{job['id']}/items").json()["items"]
    key = items[0]["input"]["image_key"]
    assert key.endswith("/inputs/00000000.png") and f"/jobs/{job['id']}/" in key
    assert local_app.app.state.runtime.store.get(key) == scene_png(1)
    assert items[0]["metadata"] == {"file": "a.png"}
    assert items[1]["input"] == {"image_url": "https://example.com/b.png"}


def test_a_cancel_that_finalises_sends_the_webhook_after_the_response(
    local_app: LocalApp,
) -> None:
    from loom import jobs

    c = local_app.client
    # .invalid never resolves: the send is attempted and rescheduled (a reconciler retries it).
    r = c.post("/v1/jobs", json={"task": "generate", "items": [{"prompt": "a red circle"}],
                                 "webhook_url": "http://hooks.loom-test.invalid/done"})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    with local_app.session_factory() as s:
        assert jobs.job_deliveries(s, job_id=job_id) == []  # nothing yet: the job is queued
    assert c.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    with local_app.session_factory() as s:
        [row] = jobs.job_deliveries(s, job_id=job_id)
    assert row["event"] == "job.completed" and row["attempts"] == 1
    assert row["status"] == "pending" and row["last_error"]


def test_generate_seeds_follow_params_seed(local_app: LocalApp) -> None:
    r = local_app.client.post("/v1/jobs", json={
        "task": "generate", "params": {"seed": 40},
        "items": [{"prompt": "a small red circle"}, {"prompt": "a large blue square", "seed": 3},
                  {"prompt": "a small red circle"}]})
    assert r.status_code == 201, r.text
    items = local_app.client.get(f"/v1/jobs/{r.json()['id']}/items").json()["items"]
    assert [i["input"]["seed"] for i in items] == [40, 3, 42]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"task": "caption"}, 422, "exactly one of 'items' or 'manifest_key'"),
        ({"task": "paint", "items": []}, 422, "task"),
        ({"task": "caption", "items": []}, 422, "at least one item"),
        ({"task": "caption", "items": [{"image_url": "ftp://x/y.png"}]}, 422, "items[0].image_url"),
        ({"task": "caption", "items": [{"image_base64": "@@@"}]}, 422, "items[0].image_base64"),
        ({"task": "caption", "items": [{"image_url": "https://e.com/a.png"},
                                       {"image_base64": b64(b"hello")}]}, 422, "items[1]"),
        ({"task": "caption", "items": [{"image_url": "https://e.com/a.png",
                                        "image_key": "x/y.png"}]}, 422, "exactly one of"),
        ({"task": "vqa", "items": [{"image_url": "https://e.com/a.png"}]}, 422,
         "items[0].question"),
        ({"task": "generate", "items": [{"prompt": "x" * 101}]}, 422, "items[0].prompt"),
        ({"task": "vqa", "items": [{"image_url": "https://e.com/a", "question": "q" * 101}]}, 422,
         "items[0].question is 101 characters"),
        ({"task": "generate", "items": [{"prompt": "a"}] * 21}, 413, "the limit is 20"),
        ({"task": "caption", "items": [{"image_key": "someone-else/jobs/x/inputs/0.png"}]}, 404,
         "items[0].image_key"),
        ({"task": "caption", "model": "nope", "items": [{"image_url": "https://e.com/a"}]}, 422,
         "unknown model"),
        ({"task": "caption", "items": [{"image_url": "https://e.com/a", "colour": 1}]}, 422,
         "items[0].colour"),
        ({"task": "generate", "items": [{"prompt": "a", "seed": -1}]}, 422, "items[0].seed"),
        ({"task": "generate", "priority": 11, "items": [{"prompt": "a"}]}, 422, "priority"),
        ({"task": "generate", "parent_job_id": "nope", "items": [{"prompt": "a"}]}, 404,
         "parent_job_id"),
    ],
)
def test_invalid_submissions_name_the_problem(
    local_app: LocalApp, body: dict[str, Any], status: int, needle: str
) -> None:
    message = error(local_app.client.post("/v1/jobs", json=body), status)
    assert needle in message
    assert local_app.published == []


def test_malformed_json(local_app: LocalApp) -> None:
    r = local_app.client.post("/v1/jobs", content=b'{"task": ',
                              headers={"Content-Type": "application/json"})
    assert "JSON" in error(r, 422, "invalid_request")


def test_body_limit_by_content_length_and_by_stream(local_app: LocalApp) -> None:
    big = b'{"task": "caption", "items": []}' + b" " * 300_000
    r = local_app.client.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"})
    assert "larger than 200000 bytes" in error(r, 413, "payload_too_large")

    def chunks() -> Any:  # no Content-Length: counted while streaming
        yield b'{"task": "caption", "items": ['
        for _ in range(100):
            yield b" " * 4000
        yield b"]}"

    r = local_app.client.post("/v1/jobs", content=chunks(),
                              headers={"Content-Type": "application/json"})
    assert "LOOM_MAX_BODY_BYTES" in error(r, 413, "payload_too_large")


def test_base64_input_over_max_input_bytes(local_app: LocalApp) -> None:
    r = local_app.client.post("/v1/jobs", json={"task": "caption",
                                                "items": [{"image_base64": "A" * 80_000}]})
    assert "items[0].image_base64" in error(r, 413, "payload_too_large")


def test_idempotency(local_app: LocalApp) -> None:
    c = local_app.client
    body = {"task": "generate", "items": [{"prompt": "a small red circle", "seed": 1}]}
    first = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    again = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    other = c.post("/v1/jobs", json={**body, "priority": 5}, headers={"Idempotency-Key": "k1"})
    assert "Idempotency-Key" in error(other, 409, "idempotency_conflict")
    assert len(local_app.published) == 1


def test_upload_multipart(local_app: LocalApp) -> None:
    c = local_app.client
    files = [("files", ("cat.png", scene_png(2), "image/png")),
             ("files", ("dog.png", scene_png(3), "image/png"))]
    r = c.post("/v1/jobs/upload", files=files, data={"task": "vqa", "question": "how many shapes are there?"})
    assert r.status_code == 201, r.text
    items = c.get(f"/v1/jobs/{r.json()['id']}/items").json()["items"]
    assert [i["metadata"]["file"] for i in items] == ["cat.png", "dog.png"]
    assert all(i["input"]["question"] == "how many shapes are there?" for i in items)
    # The same fields as one JSON "request" field.
    r = c.post("/v1/jobs/upload", files=files[:1],
               data={"request": json.dumps({"task": "caption", "priority": 3})})
    assert r.status_code == 201 and r.json()["priority"] == 3
    bad = c.post("/v1/jobs/upload", files=[("files", ("x.png", b"not an image", "image/png"))],
                 data={"task": "caption"})
    assert "x.png" in error(bad, 422, "invalid_request")
    assert "question" in error(c.post("/v1/jobs/upload", files=files, data={"task": "vqa"}), 422)
    assert "request" in error(c.post("/v1/jobs/upload", files=files, data={"request": "{"}), 422)


def test_manifest_key(local_app: LocalApp) -> None:
    c = local_app.client
    store, rt = local_app.app.state.runtime.store, local_app.app.state.runtime
    tenant = rt.local_tenant_id()
    key = f"{tenant}/manifests/m1.jsonl"
    lines = [json.dumps({"prompt": "a small red circle", "seed": i}) for i in range(30)]
    store.put(key, "\n".join(lines).encode(), "application/x-ndjson")
    r = c.post("/v1/jobs", json={"task": "generate", "manifest_key": key})
    assert r.status_code == 201, r.text
    assert r.json()["item_count"] == 30  # above max_items_per_request: manifests are for that
    store.put(f"{tenant}/manifests/bad.jsonl", b'{"prompt": "a"}\n{"nope": 1}\n', "x")
    r = c.post("/v1/jobs", json={"task": "generate", "manifest_key": f"{tenant}/manifests/bad.jsonl"})
    assert "manifest line 2" in error(r, 422)
    r = c.post("/v1/jobs", json={"task": "generate", "manifest_key": "other/manifests/m1.jsonl"})
    error(r, 404, "not_found")
    r = c.post("/v1/jobs", json={"task": "generate", "manifest_key": f"{tenant}/missing.jsonl"})
    error(r, 404, "not_found")


def test_not_found_and_pagination(local_app: LocalApp) -> None:
    c = local_app.client
    error(c.get("/v1/jobs/nope"), 404, "not_found")
    error(c.get("/v1/jobs/nope/items"), 404, "not_found")
    error(c.get("/v1/items/999/lineage"), 404, "not_found")
    error(c.get("/v1/outputs/999/content"), 404, "not_found")
    error(c.get("/v1/nothing-here"), 404, "not_found")
    ids = [c.post("/v1/jobs", json={"task": "generate", "items": [{"prompt": "a"}]}).json()["id"]
           for _ in range(3)]
    page = c.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2] and page["next_cursor"]
    rest = c.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [j["id"] for j in rest["jobs"]] == [ids[0]] and rest["next_cursor"] is None
    error(c.get("/v1/jobs", params={"cursor": "garbage!"}), 422)
    error(c.get("/v1/jobs", params={"status": "weird"}), 422, "invalid_request")


def test_auth_required_when_on(tmp_path: Path, make_settings: Any) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from loom import tenants
    from loom.db import upgrade

    settings = make_settings(auth="on", database_url=f"sqlite:///{tmp_path / 'a.db'}",
                             broker_url="memory://")
    upgrade(settings.database_url)
    app = create_app(settings, publish=lambda chunk: None)
    try:
        with app.state.runtime.session_factory() as s:
            _, secret = tenants.create_api_key(s, tenant_name="acme")
        with TestClient(app) as c:
            r = c.get("/v1/jobs")
            assert "Authorization" in error(r, 401, "unauthorized")
            assert r.headers["WWW-Authenticate"] == "Bearer"
            error(c.get("/v1/jobs", headers={"Authorization": "Bearer loom_wrong-key-1234567"}),
                  401, "unauthorized")
            ok = c.get("/v1/jobs", headers={"Authorization": f"Bearer {secret}"})
            assert ok.status_code == 200 and ok.json() == {"jobs": [], "next_cursor": None}
            assert c.get("/healthz").status_code == 200  # no key needed
    finally:
        app.state.runtime.engine.dispose()


def test_readyz_names_what_is_down(tmp_path: Path, make_settings: Any) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app

    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'missing' / 'x.db'}",
                             broker_url="redis://127.0.0.1:1/0")
    app = create_app(settings, publish=lambda chunk: None)
    try:
        with TestClient(app) as c:
            message = error(c.get("/readyz"), 503, "service_unavailable")
            assert "database" in message and "broker" in message and "storage" not in message
            assert c.get("/healthz").json() == {"status": "ok", "checks": {}}
    finally:
        app.state.runtime.engine.dispose()


def test_openapi_documents_every_route(local_app: LocalApp) -> None:
    spec = local_app.client.get("/openapi.json").json()
    paths = set(spec["paths"])
    assert {
        "/v1/jobs", "/v1/jobs/upload", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/items",
        "/v1/jobs/{job_id}/results", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/retry",
        "/v1/items/{item_id}/lineage", "/v1/outputs/{output_id}/content", "/v1/models",
        "/healthz", "/readyz", "/metrics",
    } <= paths
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_api_never_imports_torch_or_pipeline(tmp_path: Path) -> None:
    probe = f"""
import sys
from fastapi.testclient import TestClient
from loom.config import Settings
from loom.db import upgrade
from api.main import create_app
s = Settings(home={str(tmp_path)!r}, auth="off", broker_url="memory://")
upgrade(s.database_url)
app = create_app(s)
with TestClient(app) as c:
    assert c.get("/v1/models").json()["models"][0]["name"] == "loom-shapes"
    assert c.post("/v1/jobs", json={{"task": "generate", "items": [{{"prompt": "a"}}]}}).status_code == 201
    c.get("/metrics")
app.state.runtime.engine.dispose()
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "pipeline"))
print("FORBIDDEN", bad)
"""
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "FORBIDDEN []" in proc.stdout, proc.stdout


def test_model_params_are_refused_at_submit_not_retried(local_app: LocalApp) -> None:
    """Task and model capabilities come from the task registry: what a model cannot take is a
    422 naming it, and nothing is recorded or published."""
    c = local_app.client
    url = {"image_url": "https://e.com/a.png"}
    msg = error(c.post("/v1/jobs", json={"task": "caption", "model": "hf:some/model",
                                         "params": {"beams": 3}, "items": [url]}), 422)
    assert "params.beams" in msg and "hf:some/model" in msg
    msg = error(c.post("/v1/jobs", json={"task": "generate", "model": "hf:some/model",
                                         "items": [{"prompt": "a red circle"}]}), 422)
    assert "does not serve task 'generate'" in msg
    msg = error(c.post("/v1/jobs", json={"task": "caption", "params": {"temperature": 1},
                                         "items": [url]}), 422)
    assert "params.temperature" in msg and "it takes beams" in msg
    r = c.post("/v1/jobs", json={"task": "caption", "params": {"beams": 2}, "items": [url]})
    assert r.status_code == 201, r.text
    assert len(local_app.published) == 1
