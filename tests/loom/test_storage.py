"""LocalStore and S3Store (against moto_server): round trips, presigned URLs, errors, keys."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loom import s3, storage, storage_keys
from loom.errors import InputMissing, InvalidKey
from loom.s3 import S3Store
from loom.storage import LocalStore, Store

KEY = "t1/jobs/j1/outputs/00000007.png"
BAD_KEYS = ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a/./b", "a\\b", "a/b\x00", "a/ b",
            "t/%2e%2e/x", "t/%2E%2E/x", "t/a%2fb", "t/\u00e9"]


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "local":
        yield LocalStore(tmp_path / "store")
        return
    bucket_url = request.getfixturevalue("s3_bucket")
    endpoint = request.getfixturevalue("s3_endpoint")
    try:
        yield S3Store.from_url(bucket_url, endpoint_url=endpoint, max_pool_connections=4)
    finally:
        s3.close_clients()  # no unclosed sockets (warnings are errors)


def test_keys_are_deterministic_and_zero_padded() -> None:
    assert storage.input_key("t", "j", 3, "png") == "t/jobs/j/inputs/00000003.png"
    assert storage.output_key("t", "j", 12, ".JPG") == "t/jobs/j/outputs/00000012.jpg"
    assert storage.results_key("t", "j", "jsonl") == "t/jobs/j/results.jsonl"
    with pytest.raises(InvalidKey):
        storage.input_key("t", "j", 0, "png/../x")
    with pytest.raises(InvalidKey):
        storage.output_key("../t", "j", 0, "png")


def test_put_get_exists_stream(store: Store) -> None:
    assert not store.exists(KEY)
    store.put(KEY, b"\x89PNG-bytes", "image/png")
    assert store.exists(KEY)
    assert store.get(KEY) == b"\x89PNG-bytes"
    store.put(KEY, b"second version", "image/png")  # deterministic keys: re-runs overwrite
    assert store.get(KEY) == b"second version"
    assert b"".join(store.open_stream(KEY)) == b"second version"


def test_put_stream_and_delete(store: Store, tmp_path: Path) -> None:
    """Uploads of the Files API: a file object in blocks (S3: a multipart upload past 8 MiB)."""
    key = storage.file_key("t1", "file-abc", "JSONL")
    assert key == "t1/files/file-abc.jsonl"
    data = os.urandom(9 * 1024 * 1024 + 17)
    src = tmp_path / "upload.bin"
    src.write_bytes(data)
    with src.open("rb") as f:
        store.put_stream(key, f, "application/x-ndjson")
    assert store.get(key) == data
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # idempotent


def test_missing_key_raises_input_missing(store: Store) -> None:
    with pytest.raises(InputMissing):
        store.get("t1/jobs/j1/inputs/00000000.png")
    with pytest.raises(InputMissing):
        list(store.open_stream("t1/jobs/j1/inputs/00000000.png"))


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_bad_keys_are_refused(store: Store, bad: str) -> None:
    # Permanent, not a store outage: a worker must fail the item, not retry it.
    with pytest.raises(InvalidKey) as put_exc:
        store.put(bad, b"x", "text/plain")
    with pytest.raises(InvalidKey) as get_exc:
        store.get(bad)
    for exc in (put_exc.value, get_exc.value):
        assert exc.code == "invalid_key" and not exc.transient
    with pytest.raises(InvalidKey):
        storage_keys.validate_key(bad)  # the public check the API runs at submit


def test_local_store_writes_atomically_inside_its_root(tmp_path: Path) -> None:
    root = tmp_path / "store"
    s = LocalStore(root)
    s.put(KEY, b"data", "image/png")
    assert (root / KEY).read_bytes() == b"data"
    leftovers = [p for p in (root / KEY).parent.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []
    assert s.url(KEY) is None
    # A symlink planted inside the store cannot lead out of it.
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "evil")
    with pytest.raises(InvalidKey):
        s.put("evil/x.txt", b"x", "text/plain")
    assert not (outside / "x.txt").exists()
    # ... nor a file symlink planted in a folder the store has already used.
    (outside / "secret").write_bytes(b"secret")
    os.symlink(outside / "secret", (root / KEY).parent / "link.png")
    with pytest.raises(InvalidKey):
        s.get(KEY.rsplit("/", 1)[0] + "/link.png")
    # Writing to that key replaces the link itself; the file it pointed at is untouched.
    s.put(KEY.rsplit("/", 1)[0] + "/link.png", b"mine", "image/png")
    assert (outside / "secret").read_bytes() == b"secret"
    assert s.get(KEY.rsplit("/", 1)[0] + "/link.png") == b"mine"


def test_local_store_put_file_links_on_its_filesystem(tmp_path: Path) -> None:
    """An embedded run's inputs are linked, not copied (same bytes, same inode, nothing left
    behind); a source that cannot be read raises OSError and stores nothing."""
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "in.png"
    src.write_bytes(b"\x89PNG\r\n\x1a\nbody")
    store.put_file("t/a/in.png", src)
    assert store.get("t/a/in.png") == src.read_bytes()
    assert os.stat(tmp_path / "store" / "t/a/in.png").st_ino == src.stat().st_ino
    with pytest.raises(OSError):
        store.put_file("t/a/gone.png", tmp_path / "missing.png")
    assert sorted(p.name for p in (tmp_path / "store" / "t" / "a").iterdir()) == ["in.png"]


def test_local_store_put_file_stores_a_symlinks_target(tmp_path: Path) -> None:
    """A folder of symlinked images (a dataset laid out by links) is stored by target: link(2)
    links a symlink itself, which the store would then refuse to read (every item failed with
    invalid_key)."""
    store = LocalStore(tmp_path / "store")
    target = tmp_path / "data" / "real.png"
    target.parent.mkdir()
    target.write_bytes(b"\x89PNG\r\n\x1a\nreal")
    link = tmp_path / "view" / "a.png"
    link.parent.mkdir()
    os.symlink(target, link)
    store.put_file("t/a/in.png", link)
    stored = tmp_path / "store" / "t/a/in.png"
    assert not stored.is_symlink() and os.stat(stored).st_ino == target.stat().st_ino
    assert store.get("t/a/in.png") == target.read_bytes()


def test_s3_presigned_url_serves_the_bytes(s3_bucket: str, s3_endpoint: str) -> None:
    s = S3Store.from_url(s3_bucket, endpoint_url=s3_endpoint)
    try:
        s.put(KEY, b"presigned!", "image/png")
        url = s.url(KEY, expires_seconds=60)
        assert url is not None and url.startswith(s3_endpoint)
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200 and response.content == b"presigned!"
    finally:
        s3.close_clients()


def test_s3_client_is_cached_per_process(s3_endpoint: str) -> None:
    try:
        a = s3.s3_client(s3_endpoint, max_pool_connections=8)
        assert s3.s3_client(s3_endpoint, max_pool_connections=8) is a
        # botocore stores Config(retries={"max_attempts": 5}) as 5 retries = 6 attempts in all.
        assert a.meta.config.retries == {"mode": "standard", "total_max_attempts": 6}
        assert a.meta.config.max_pool_connections == 8
    finally:
        s3.close_clients()


def test_store_from_url_and_settings(make_settings: object, tmp_path: Path) -> None:
    assert s3.parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b")
    assert s3.parse_s3_url("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError):
        s3.parse_s3_url("http://bucket/a")
    remote = storage.store_from_url("s3://bkt/pre", endpoint_url="http://minio:9000")
    assert isinstance(remote, S3Store) and (remote.bucket, remote.prefix) == ("bkt", "pre")
    local = storage.store_from_url(f"file://{tmp_path / 'st'}")
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "st").resolve()
    settings = make_settings()  # type: ignore[operator]
    default = storage.store_from_settings(settings)
    assert isinstance(default, LocalStore)
    assert default.root == (settings.home / "store").resolve()


@pytest.mark.parametrize("bad", ["t/%2e%2e/x.png", "t/../x.png", "t//x.png"])
def test_a_bad_key_that_reaches_a_worker_fails_its_item_for_good(
    tmp_path: Path, make_settings: Any, bad: str
) -> None:
    # Rows written before the submit check existed: invalid_key, not a retried storage_error.
    from loom.jobs import ClaimedItem
    from worker.inputs import prepare

    item = ClaimedItem(id=1, job_id="j", tenant_id="t", index=0, task="caption",
                       model_name="loom-shapes", params={}, input={"image_key": bad},
                       attempts=1)
    prep = prepare(item, settings=make_settings(), store=LocalStore(tmp_path / "s"))
    assert prep.error is not None and prep.error.code == "invalid_key"
    assert not prep.error.transient
