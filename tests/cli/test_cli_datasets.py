"""Datasets through the embedded CLI, written and read back with the real libraries: a Parquet
table of image bytes -> Parquet, WebDataset shards -> JSONL, a Hugging Face dataset ->
an HF dataset folder, a CSV of prompts, and a --limit preview."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa  # the dev extra installs pyarrow and datasets: never skipped
import pytest

from test_cli import loom, rows


def scenes(n: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """(PNG bytes, true caption) of fresh shapes-world scenes."""
    from pipeline import data

    out = []
    rng = random.Random(seed)
    for _ in range(n):
        scene = data.sample_scene(rng)
        buf = io.BytesIO()
        data.render(scene, size=64).save(buf, format="PNG")
        out.append((buf.getvalue(), data.caption(scene)))
    return out


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fixtures_worker import require_model

    require_model()
    return tmp_path_factory.mktemp("loom-datasets")


def test_parquet_in_parquet_out(home: Path) -> None:
    import pyarrow.parquet as pq

    truth = scenes(12, seed=1)
    table = pa.table({"uid": [f"s{i}" for i in range(12)], "img": [b for b, _ in truth],
                      "split_note": ["a"] * 12})
    pq.write_table(table, home / "in.parquet")
    loom(home, "caption", str(home / "in.parquet"), "--image-col", "img", "--id-col", "uid",
         "--out", str(home / "out.parquet"))
    got = pq.read_table(home / "out.parquet").to_pylist()
    assert [r["uid"] for r in got] == [f"s{i}" for i in range(12)]
    assert [r["img"] for r in got] == [b for b, _ in truth]  # the bytes the user gave
    assert all(r["status"] == "succeeded" and r["model"] == "loom-shapes" for r in got)
    assert all(len(r["input_sha256"]) == 64 and r["weights_sha256"] for r in got)
    assert got[0]["split_note"] == "a"  # other columns travel along as metadata
    right = sum(r["text"] == c for r, (_, c) in zip(got, truth))
    assert right >= 11, f"{right}/12 captions right"


def test_webdataset_in_jsonl_out_and_a_preview(home: Path) -> None:
    import tarfile

    truth = scenes(6, seed=2)
    shard = home / "shard-00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, (png, _) in enumerate(truth):
            for name, data in ((f"k{i:03d}.png", png),
                               (f"k{i:03d}.json", json.dumps({"source": "synthetic"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = home / "wds.jsonl"
    proc = loom(home, "caption", str(shard), "--out", str(out))
    got = rows(out)
    assert [r["__key__"] for r in got] == [f"k{i:03d}" for i in range(6)]
    assert sum(r["caption"] == c for r, (_, c) in zip(got, truth)) >= 5
    proc = loom(home, "caption", str(shard), "--limit", "2", "--out", str(home / "p.jsonl"))
    assert len(rows(home / "p.jsonl")) == 2
    assert "preview: 2 of 6 items" in proc.stderr and "full run would take" in proc.stderr


def test_hf_dataset_in_hf_out(home: Path) -> None:
    import datasets
    truth = scenes(5, seed=3)
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b, _ in truth], "row": list(range(5))},
        features=datasets.Features({"image": datasets.Image(), "row": datasets.Value("int64")}))
    ds.save_to_disk(str(home / "hf-in"))
    loom(home, "caption", str(home / "hf-in"), "--out", str(home / "hf-out"), "--format", "hf")
    back = datasets.load_dataset(str(home / "hf-out"))["train"]
    assert back.num_rows == 5
    assert back.features["image"].__class__.__name__ == "Image"
    texts: list[Any] = back["text"]
    assert sum(t == c for t, (_, c) in zip(texts, truth)) >= 4


def test_prompts_from_a_csv(home: Path) -> None:
    (home / "prompts.csv").write_text("prompt,ref\na small red circle,p1\n"
                                      "a large blue square,p2\n")
    loom(home, "generate", "--prompts", str(home / "prompts.csv"), "--out", str(home / "g"),
         "--seed", "5")
    index = rows(home / "g" / "index.jsonl")
    assert [(r["ref"], r["prompt"], r["seed"]) for r in index] == [
        ("p1", "a small red circle", 5), ("p2", "a large blue square", 6)]
    assert all((home / "g" / r["file"]).read_bytes().startswith(b"\x89PNG") for r in index)


def test_a_table_of_s3_paths(home: Path, s3_endpoint: str, s3_bucket: str) -> None:
    """Image paths in a table may be s3:// objects (read through LOOM_S3_ENDPOINT_URL, as from
    MinIO); one that does not exist fails its own item with the reason, not the job."""
    import boto3
    import pyarrow.parquet as pq

    truth = scenes(3, seed=7)
    bucket = s3_bucket.removeprefix("s3://").split("/")[0]
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    try:
        for i, (png, _) in enumerate(truth):
            client.put_object(Bucket=bucket, Key=f"raw/{i}.png", Body=png)
    finally:
        client.close()
    paths = [f"s3://{bucket}/raw/{i}.png" for i in range(3)] + [f"s3://{bucket}/raw/gone.png"]
    pq.write_table(pa.table({"path": paths, "n": [0, 1, 2, 3]}), home / "s3.parquet")
    proc = loom(home, "caption", str(home / "s3.parquet"), "--image-col", "path", "--no-cache",
                "--out", str(home / "s3.jsonl"), ok=False,
                env_extra={"LOOM_S3_ENDPOINT_URL": s3_endpoint})
    assert proc.returncode == 3, proc.stdout + proc.stderr  # finished, one item failed
    got = {r["n"]: r for r in rows(home / "s3.jsonl")}
    assert [got[i]["caption"] for i in range(3)] == [c for _, c in truth]
    assert got[3]["caption"] is None and "gone.png" in got[3]["read_error"]
