"""Dataset outputs: a real job (loom.jobs on SQLite, images in a LocalStore) whose inputs came from
a Parquet table through loom.datasets, exported with the writers and read back with pyarrow,
webdataset and datasets; the streamed forms; COCO width/height; and a memory bound."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from loom import exports, jobs, tenants
from loom.datasets import open_source, store_images, stream_rows, write_rows, writer_for
from loom.db import make_engine, make_session_factory
from loom.jobs import ItemFailure, ItemResult
from loom.storage import LocalStore, output_key

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROOT = Path(__file__).resolve().parents[2]
N = 30


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8 + i % 3, 5), (i, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def run_job(session: Any, store: LocalStore, task: str, items: list[dict[str, Any]]) -> str:
    """Submit, then complete every item as a worker would (item 3 fails), without a model."""
    from loom.errors import InvalidInput

    tenant = tenants.ensure_tenant(session, name="t").id
    job = jobs.submit_job(session, tenant_id=tenant, task=task, model_name="loom-shapes",
                          items=items, chunk_size=64, max_attempts=1)
    claimed = jobs.claim_items(session, job_id=job.id, start=0, end=len(items), worker_id="w1",
                               limit=1000, lease_seconds=60)
    results, failures = [], []
    for c in claimed:
        if c.index == 3:
            failures.append(ItemFailure(c.id, InvalidInput("corrupt image"), attempt=c.attempts))
        elif task == "generate":
            key = output_key(tenant, job.id, c.index, "png")
            store.put(key, png(c.index), "image/png")
            results.append(ItemResult(
                c.id, "image", storage_key=key, content_type="image/png", sha256="s" * 64,
                input_sha256="i" * 64, model_version="1", weights_sha256="w" * 64,
                seed=c.input["seed"], attempt=c.attempts))
        else:
            results.append(ItemResult(
                c.id, "text", text=f"caption {c.index}", input_sha256="i" * 64,
                model_version="1", weights_sha256="w" * 64, seed=7, attempt=c.attempts,
                timings={"infer_ms": 1.5}))
    jobs.complete_items(session, worker_id="w1", results=results)
    jobs.fail_items(session, worker_id="w1", failures=failures, backoff_seconds=0)
    return job.id


@pytest.fixture
def env(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[Any, LocalStore]]:
    engine = make_engine(sqlite_url)
    try:
        with make_session_factory(engine)() as session:
            yield session, LocalStore(tmp_path / "store")
    finally:
        engine.dispose()


def items_from_table(tmp_path: Path, task: str) -> list[dict[str, Any]]:
    """A Parquet input read through loom.datasets, turned into job items (the CLI's wiring)."""
    table = pa.table({
        "key": [f"img-{i}" for i in range(N)],
        "url": [f"https://example.com/{i}.png" for i in range(N)],
        "prompt": [f"circle {i}" for i in range(N)],
        "label": [i % 4 for i in range(N)],
    })
    pq.write_table(table, tmp_path / "in.parquet")
    out = []
    for batch in open_source(tmp_path / "in.parquet", id_col="key"):
        for i, it in enumerate(batch, start=len(out)):
            inp = ({"prompt": it["prompt"], "seed": 100 + i} if task == "generate"
                   else {"image_url": it["image_url"]})
            out.append({"input": inp, "metadata": {"id": it["id"], **it["metadata"]}})
    return out


def test_parquet_out_round_trip(env: Any, tmp_path: Path) -> None:
    session, store = env
    job_id = run_job(session, store, "caption", items_from_table(tmp_path, "caption"))
    rows = list(exports.result_rows(session, job_id=job_id))
    res = write_rows("parquet", rows, tmp_path / "out.parquet", task="caption",
                     row_group_rows=7)
    assert res.rows == N and res.paths == [tmp_path / "out.parquet"]
    f = pq.ParquetFile(tmp_path / "out.parquet")
    assert f.metadata.num_row_groups == 5  # streamed in row groups of 7
    got = f.read().to_pylist()
    assert [g["id"] for g in got] == [f"img-{i}" for i in range(N)]
    assert [g["label"] for g in got] == [i % 4 for i in range(N)]
    assert got[0]["text"] == "caption 0" and got[0]["status"] == "succeeded"
    assert got[0]["input_image"] == "https://example.com/0.png"
    assert (got[0]["model"], got[0]["model_version"], got[0]["weights_sha256"],
            got[0]["input_sha256"], got[0]["seed"], got[0]["attempt"], got[0]["worker_id"]) == (
        "loom-shapes", "1", "w" * 64, "i" * 64, 7, 1, "w1")
    assert json.loads(got[0]["timings"]) == {"infer_ms": 1.5}
    assert got[0]["started_at"] is not None and got[0]["finished_at"] >= got[0]["started_at"]
    assert (got[3]["status"], got[3]["error_code"], got[3]["error_message"], got[3]["text"]) == (
        "failed", "invalid_input", "corrupt image", None)
    assert all(g["metadata_extra"] is None for g in got)

    # Sharded into a folder; and the streamed form is the same table.
    res = write_rows("parquet", rows, tmp_path / "shards", task="caption", shard_rows=12)
    assert [p.name for p in res.paths] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(p).num_rows for p in res.paths] == [12, 12, 6]
    import pyarrow.dataset as ds

    assert ds.dataset(tmp_path / "shards").to_table().to_pylist() == got
    streamed = b"".join(stream_rows("parquet", iter(rows), task="caption"))
    assert pq.read_table(io.BytesIO(streamed)).to_pylist() == got


def test_metadata_that_changes_shape_is_kept(tmp_path: Path) -> None:
    base = {"status": "succeeded", "input": {}, "output": None, "error": None, "lineage": None}
    rows = [{**base, "index": i, "item_id": i + 1, "metadata": {"n": i}} for i in range(4)]
    rows.append({**base, "index": 4, "item_id": 5, "metadata": {"n": "five", "new": [1, 2]}})
    with writer_for("parquet", tmp_path / "m.parquet", task="caption", row_group_rows=2) as w:
        w.write(rows)
    got = pq.read_table(tmp_path / "m.parquet").to_pylist()
    assert [g["n"] for g in got] == [0, 1, 2, 3, None]
    assert json.loads(got[4]["metadata_extra"]) == {"n": "five", "new": [1, 2]}


def test_webdataset_out_read_by_webdataset(env: Any, tmp_path: Path) -> None:
    pytest.importorskip("webdataset")
    session, store = env
    job_id = run_job(session, store, "generate", items_from_table(tmp_path, "generate"))
    rows = list(exports.result_rows(session, job_id=job_id))
    res = write_rows("webdataset", rows, tmp_path / "wds", task="generate", shard_rows=10,
                     images=store_images(store))
    assert len(res.paths) == 3 and res.rows == N
    from webdataset.tariterators import group_by_keys, tar_file_expander

    # webdataset's own tar expansion and key grouping (wds.WebDataset itself leaves the last
    # shard's file open, which warnings-as-errors turns into a failure).
    samples = []
    for path in res.paths:
        with path.open("rb") as f:
            samples += list(group_by_keys(tar_file_expander([{"stream": f, "url": str(path)}])))
    assert len(samples) == N
    by_key = {s["__key__"]: s for s in samples}
    s0 = by_key["00000000"]
    assert s0["png"] == png(0) and s0["txt"] == b"circle 0"
    meta = json.loads(s0["json"])
    assert meta["id"] == "img-0" and meta["lineage"]["seed"] == 100
    assert meta["metadata"]["label"] == 0 and meta["task"] == "generate"
    failed = by_key["00000003"]
    assert "png" not in failed and json.loads(failed["json"])["error"]["code"] == "invalid_input"
    # One streamed tar holds the same samples.
    data = b"".join(stream_rows("webdataset", iter(rows), task="generate",
                                images=store_images(store)))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
    assert len(names) == 3 * N - 1 and names[:3] == ["00000000.png", "00000000.txt",
                                                    "00000000.json"]


def test_hf_out_opened_by_datasets(env: Any, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    session, store = env
    job_id = run_job(session, store, "generate", items_from_table(tmp_path, "generate"))
    rows = exports.result_rows(session, job_id=job_id)
    res = write_rows("hf", rows, tmp_path / "hf", task="generate", images=store_images(store),
                     shard_rows=20, arrow=True)
    assert [p.name for p in res.paths] == ["train-00000.parquet", "train-00001.parquet"]
    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "hf" / "data"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert len(ds) == N
    assert ds[5]["image"].size == (10, 5) and ds[5]["image"].getpixel((0, 0)) == (5, 0, 0)
    assert ds[5]["prompt"] == "circle 5" and ds[5]["id"] == "img-5"
    assert ds[3]["image"] is None and ds[3]["error_code"] == "invalid_input"
    # The same folder is a save_to_disk dataset (converted by datasets at close).
    saved = datasets.load_from_disk(str(tmp_path / "hf"))
    assert isinstance(saved.features["image"], datasets.Image) and len(saved) == N
    assert saved[5]["image"].getpixel((0, 0)) == (5, 0, 0) and saved[5]["id"] == "img-5"
    assert not list((tmp_path / "hf").glob(".hf-cache-*"))
    # The folder is itself a dataset that loom.datasets reads back.
    back = [it for b in open_source(tmp_path / "hf") for it in b]
    assert [it["id"] for it in back] == [f"img-{i}" for i in range(N)]
    assert back[5]["image_bytes"] == png(5)


def test_coco_width_and_height(env: Any, tmp_path: Path) -> None:
    session, store = env
    job_id = run_job(session, store, "generate", items_from_table(tmp_path, "generate"))
    rows = exports.result_rows(session, job_id=job_id)
    doc = json.loads(b"".join(exports.stream(
        "coco", rows, job={"task": "generate"}, size_of=exports.store_size(store))))
    sizes = {im["id"]: (im["width"], im["height"]) for im in doc["images"]}
    assert sizes[5] == (10, 5) and sizes[6] == (8, 5) and 3 not in sizes
    caption = [{"index": 0, "metadata": {"width": 640, "height": 480}, "input": {},
                "output": {"text": "x"}}]
    doc = json.loads(b"".join(exports.coco_chunks(caption, {"task": "caption"})))
    assert (doc["images"][0]["width"], doc["images"][0]["height"]) == (640, 480)


PROBE = r"""
import json, resource, sys
import loom.datasets as D
n, fmt, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
marks = {}
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
def rows():
    for i in range(n):
        if i == n // 5:
            marks["at20"] = rss()
        yield {"index": i, "item_id": i + 1, "status": "succeeded",
               "metadata": {"id": f"img-{i}", "label": i % 10},
               "input": {"image_url": f"http://h/{i}.png"},
               "output": {"kind": "text", "text": f"a caption number {i}"}, "error": None,
               "lineage": {"model": "m", "model_version": "1", "weights_sha256": "w" * 64,
                           "seed": i, "attempt": 1, "worker_id": "w", "input_sha256": "i" * 64}}
D.write_rows(fmt, rows(), out, task="caption", shard_rows=n // 2)
# VmHWM: this process image's peak (ru_maxrss would include the forking pytest's size).
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
print(json.dumps({"at20": marks["at20"], "peak": peak}))
"""


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_memory_stays_flat(fmt: str, tmp_path: Path) -> None:
    """200,000 rows: the peak RSS is within 40 MB of the RSS after the first 20% (a writer that
    kept rows would grow by ~100 MB); bench/dataset_export.py measures 1,000,000."""
    proc = subprocess.run([sys.executable, "-c", PROBE, "200000", fmt, str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["peak"] - m["at20"] < 40, m
