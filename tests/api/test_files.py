"""The Files API against real services: PostgreSQL, S3 (moto_server), the API under uvicorn, the
SDK over HTTP; tenant scoping with two API keys; a manifest uploaded as a file becomes a job.
Then the same routes on SQLite + a local store (limits, purposes, image files as image_key)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api_helpers import LocalApp, scene_png
from fixtures_worker import serve

MAX_FILE = 12 * 1024 * 1024


class FilesStack:
    def __init__(self, url: str, keys: dict[str, str], store: Any, published: list[Any]) -> None:
        self.url, self.keys, self.store, self.published = url, keys, store, published

    def client(self, tenant: str) -> Any:
        from loom.client import Client

        return Client(self.url, self.keys[tenant], timeout=60)


@pytest.fixture(scope="module")
def files_stack(
    pg_url_module: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FilesStack]:
    import boto3

    from api.main import create_app
    from loom import tenants
    from loom.config import Settings
    from loom.db import make_engine, make_session_factory
    from loom.storage import store_from_settings

    bucket = f"loom-files-{secrets.token_hex(5)}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    s3.close()
    settings = Settings(
        home=tmp_path_factory.mktemp("files"), database_url=pg_url_module,
        broker_url="memory://", storage_url=f"s3://{bucket}/t", s3_endpoint_url=s3_endpoint,
        auth="on", max_items_per_request=100, max_body_bytes=200_000, max_file_bytes=MAX_FILE,
    )
    engine = make_engine(pg_url_module)
    keys: dict[str, str] = {}
    with make_session_factory(engine)() as s:
        for name in ("alpha", "beta"):
            keys[name] = tenants.create_api_key(s, tenant_name=name)[1]
    published: list[Any] = []
    app = create_app(settings, publish=published.append)
    try:
        with serve(app) as url:
            yield FilesStack(url, keys, store_from_settings(settings), published)
    finally:
        app.state.runtime.engine.dispose()
        engine.dispose()


def test_files_round_trip_on_postgres_and_s3(files_stack: FilesStack, tmp_path: Path) -> None:
    with files_stack.client("alpha") as alpha, files_stack.client("beta") as beta:
        round_trip(files_stack, alpha, beta, tmp_path)


def round_trip(files_stack: FilesStack, alpha: Any, beta: Any, tmp_path: Path) -> None:
    # A 9 MiB file: over boto3's 8 MiB threshold, so S3 receives a multipart upload.
    big = tmp_path / "table.parquet"
    data = os.urandom(9 * 1024 * 1024)
    big.write_bytes(data)
    f1 = alpha.upload_file(big, purpose="dataset")
    assert f1["bytes"] == len(data) and f1["sha256"] == hashlib.sha256(data).hexdigest()
    assert f1["filename"] == "table.parquet" and f1["purpose"] == "dataset"
    assert f1["id"].startswith("file-") and f1["key"].endswith(f"/files/{f1['id']}.parquet")
    assert files_stack.store.get(f1["key"]) == data

    # A manifest bigger than one request may carry (100 items), submitted by its key.
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text("".join(json.dumps({"prompt": f"a red circle {i}",
                                            "metadata": {"n": i}}) + "\n" for i in range(250)))
    f2 = alpha.upload_file(manifest)
    assert f2["purpose"] == "manifest" and f2["key"].endswith(".jsonl")
    job = alpha.submit("generate", manifest_key=f2["key"])
    assert job["item_count"] == 250 and files_stack.published

    page = alpha.files()
    assert [f["id"] for f in page["data"]] == [f2["id"], f1["id"]]  # newest first
    assert [f["id"] for f in alpha.files(purpose="dataset")["data"]] == [f1["id"]]
    first = alpha.files(limit=1)
    assert [f["id"] for f in first["data"]] == [f2["id"]] and first["next_cursor"]
    rest = alpha.files(limit=1, cursor=first["next_cursor"])
    assert [f["id"] for f in rest["data"]] == [f1["id"]] and rest["next_cursor"] is None
    assert alpha.file(f1["id"]) == f1

    # Another tenant sees nothing of it: 404s, an empty list, and the key is not theirs.
    from loom.client import ApiError

    for call in (lambda: beta.file(f1["id"]), lambda: beta.delete_file(f1["id"]),
                 lambda: beta.submit("generate", manifest_key=f2["key"])):
        with pytest.raises(ApiError) as err:
            call()
        assert err.value.http_status == 404 and err.value.code == "not_found"
    assert beta.files()["data"] == []

    assert alpha.delete_file(f1["id"]) == {"id": f1["id"], "object": "file", "deleted": True}
    assert not files_stack.store.exists(f1["key"])
    with pytest.raises(ApiError) as err:
        alpha.file(f1["id"])
    assert err.value.http_status == 404
    assert [f["id"] for f in alpha.files()["data"]] == [f2["id"]]


def test_file_size_limit_is_its_own(files_stack: FilesStack, tmp_path: Path) -> None:
    from loom.client import ApiError

    with files_stack.client("alpha") as alpha:
        size_limits(files_stack, alpha, tmp_path)


def size_limits(files_stack: FilesStack, alpha: Any, tmp_path: Path) -> None:
    from loom.client import ApiError

    too_big = tmp_path / "big.bin"
    too_big.write_bytes(b"\0" * (MAX_FILE + 2 * 1024 * 1024))
    with pytest.raises(ApiError) as err:
        alpha.upload_file(too_big, purpose="dataset")
    assert err.value.http_status == 413 and "LOOM_MAX_FILE_BYTES" in err.value.message
    # Just over the limit but inside the multipart allowance: the route's own check.
    edge = tmp_path / "edge.bin"
    edge.write_bytes(b"\1" * (MAX_FILE + 10))
    with pytest.raises(ApiError) as err:
        alpha.upload_file(edge, purpose="dataset")
    assert err.value.http_status == 413
    assert alpha.files(purpose="dataset")["data"] == []
    # Other routes keep LOOM_MAX_BODY_BYTES (200 kB here).
    r = httpx.post(f"{files_stack.url}/v1/jobs", content=b"x" * 300_000,
                   headers={"Authorization": f"Bearer {files_stack.keys['alpha']}",
                            "Content-Type": "application/json"})
    assert r.status_code == 413 and "LOOM_MAX_BODY_BYTES" in r.json()["error"]["message"]
    r = httpx.get(f"{files_stack.url}/v1/files")
    assert r.status_code == 401


def test_files_on_sqlite_and_local_store(local_app: LocalApp) -> None:
    c = local_app.client
    image = scene_png(3)
    r = c.post("/v1/files", files={"file": ("cat.png", image, "image/png")},
               data={"purpose": "image"})
    assert r.status_code == 201, r.text
    f = r.json()
    assert f["bytes"] == len(image) and f["key"].endswith(".png")
    assert f["sha256"] == hashlib.sha256(image).hexdigest()
    # An image file's key is an item's image_key.
    r = c.post("/v1/jobs", json={"task": "caption", "items": [{"image_key": f["key"]}]})
    assert r.status_code == 201, r.text

    def error(resp: httpx.Response, status: int) -> str:
        assert resp.status_code == status, resp.text
        body = resp.json()["error"]
        return f"{body['code']}: {body['message']}"

    r = c.post("/v1/files", files={"file": ("x.png", b"not an image", "image/png")},
               data={"purpose": "image"})
    assert "invalid_request" in error(r, 422)
    r = c.post("/v1/files", files={"file": ("x.jsonl", b"{}", "text/plain")},
               data={"purpose": "fine-tune"})
    assert "purpose" in error(r, 422)
    r = c.post("/v1/files", files={"file": ("x.jsonl", b"", "text/plain")})
    assert "empty" in error(r, 422)
    r = c.post("/v1/files", data={"purpose": "manifest"})
    assert "file" in error(r, 422)
    # The user's file name is metadata only: never part of the key.
    r = c.post("/v1/files", files={"file": ("../../etc/passwd.jsonl", io.BytesIO(b"{}\n"))})
    assert r.status_code == 201
    assert r.json()["filename"] == "passwd.jsonl" and ".." not in r.json()["key"]
    assert "not_found" in error(c.get("/v1/files/file-nope"), 404)
    assert "invalid pagination cursor" in error(c.get("/v1/files?cursor=zzz"), 422)
    assert len(c.get("/v1/files").json()["data"]) == 2


def test_submit_dataset_streams_a_job_past_the_request_limits(local_app: Any) -> None:
    """``Client.submit_dataset`` (what ``loom submit`` uses for local images and datasets):
    one bounded upload per image and a manifest, then one job; the per-request item cap and
    body limit never cap the job, and a corrupt image is accepted to fail its own item."""
    from loom.client import Client

    c = Client("http://testserver", "unused")
    c._http = local_app.client  # the real app, over its ASGI transport
    items: list[dict[str, Any]] = [
        {"image_bytes": scene_png(i), "metadata": {"id": f"r{i}"}} for i in range(24)]
    items.append({"image_bytes": b"not an image at all", "metadata": {"id": "broken"}})
    items.append({"image_url": "https://example.com/a.png", "metadata": {"id": "url"}})
    assert len(items) > local_app.settings.max_items_per_request
    job = c.submit_dataset("caption", items, cache=False)
    assert job["item_count"] == 26 and job["cache"] is False
    assert len(local_app.published) == 1
    listed = local_app.client.get(f"/v1/jobs/{job['id']}/items", params={"limit": 100}).json()
    by_id = {i["metadata"]["id"]: i for i in listed["items"]}
    assert by_id["url"]["input"] == {"image_url": "https://example.com/a.png"}
    store = local_app.app.state.runtime.store
    assert store.get(by_id["r3"]["input"]["image_key"]) == scene_png(3)
    assert store.get(by_id["broken"]["input"]["image_key"]) == b"not an image at all"


def test_submit_dataset_retried_with_its_key_is_the_same_job(local_app: Any) -> None:
    """A retried ``submit_dataset`` uploads its manifest again (a new file key); idempotency
    compares the manifest's sha256, so the retry gets the first job and different rows under
    the same key are a conflict. A bad line deep in a streamed manifest names its line and
    records nothing."""
    from loom.client import ApiError, Client

    c = Client("http://testserver", "unused")
    c._http = local_app.client
    rows = [{"prompt": f"a red circle {i}", "metadata": {"n": i}} for i in range(150)]
    first = c.submit_dataset("generate", iter(rows), idempotency_key="nightly-1")
    again = c.submit_dataset("generate", iter(rows), idempotency_key="nightly-1")
    assert again["id"] == first["id"] and first["item_count"] == 150
    with pytest.raises(ApiError) as conflict:
        c.submit_dataset("generate", iter(rows[:-1]), idempotency_key="nightly-1")
    assert conflict.value.code == "idempotency_conflict"

    bad = [*rows, "{not json", *rows]
    manifest = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in bad)
    key = c.upload_bytes(manifest.encode(), filename="m.jsonl", purpose="manifest")["key"]
    r = local_app.client.post("/v1/jobs", json={"task": "generate", "manifest_key": key})
    assert r.status_code == 422 and "manifest line 151" in r.json()["error"]["message"], r.text
    assert len(local_app.client.get("/v1/jobs").json()["jobs"]) == 1
