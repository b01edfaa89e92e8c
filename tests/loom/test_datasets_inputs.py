"""Dataset inputs, round-tripped against the real libraries: a table / shard set / HF dataset is
written with pyarrow, pandas, webdataset or datasets, read back with loom.datasets.open_source,
and compared with what was written."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from loom.datasets import detect_format, open_source
from loom.errors import InvalidRequest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def png(i: int, size: tuple[int, int] = (6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (i % 256, 10, 20)).save(buf, format="PNG")
    return buf.getvalue()


def flat(source: Any, **kwargs: Any) -> list[dict[str, Any]]:
    batches = list(open_source(source, **kwargs))
    assert all(0 < len(b) <= kwargs.get("batch_size", 1000) for b in batches)
    return [item for b in batches for item in b]


N = 25


def test_parquet_urls_bytes_and_paths(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    table = pa.table({
        "uid": [f"u{i}" for i in range(N)],
        "url": [f"https://example.com/{i}.png" for i in range(N)],
        "label": list(range(N)),
        "when": pa.array([None] * N, type=pa.timestamp("s")),
    })
    pq.write_table(table, tmp_path / "urls.parquet", row_group_size=7)
    items = flat(tmp_path / "urls.parquet", id_col="uid", batch_size=10)
    assert [it["id"] for it in items] == [f"u{i}" for i in range(N)]
    assert [it["image_url"] for it in items] == table.column("url").to_pylist()
    # Every column travels under its own name (the image column too: a URL, as given).
    assert [it["metadata"] for it in items] == [
        {"uid": f"u{i}", "url": f"https://example.com/{i}.png", "label": i, "when": None}
        for i in range(N)]
    described = items[0]["columns"]
    assert described["names"] == ["uid", "url", "label", "when"]
    assert (described["id"], described["image"], described["image_bytes"]) == (
        "uid", "url", False)

    # Binary image column (auto-detected by type) and a question column.
    blobs = pa.table({"jpg": [png(i) for i in range(N)], "question": ["what?"] * N,
                      "id": list(range(N))})
    pq.write_table(blobs, tmp_path / "blobs.parquet")
    items = flat(tmp_path / "blobs.parquet")
    assert [it["image_bytes"] for it in items] == [png(i) for i in range(N)]
    assert {it["question"] for it in items} == {"what?"}
    assert [it["id"] for it in items] == [str(i) for i in range(N)]
    # Bytes never travel as metadata (they come back from the stored input); the id keeps its
    # type.
    assert [it["metadata"] for it in items] == [{"question": "what?", "id": i} for i in range(N)]
    assert items[0]["columns"]["image_bytes"] is True

    # Relative paths resolve against the table's folder; s3:// stays a URI.
    paths = pa.table({"path": ["imgs/a.png", "s3://bucket/x/b.jpg"]})
    pq.write_table(paths, tmp_path / "paths.parquet")
    items = flat(tmp_path / "paths.parquet")
    assert items[0]["image_path"] == str((tmp_path / "imgs" / "a.png").resolve())
    assert items[1]["image_path"] == "s3://bucket/x/b.jpg"


def test_csv_tsv_jsonl_with_real_writers(tmp_path: Path) -> None:
    import pandas as pd
    import pyarrow.csv as pcsv

    rows = {
        "image_url": [f"http://h/{i}.jpg" for i in range(N)],
        "prompt": [f"a red circle, {i}, with \"quotes\"" for i in range(N)],
        "note": [f"line\nbreak {i}" for i in range(N)],
    }
    pcsv.write_csv(pa.table(rows), tmp_path / "t.csv")
    pcsv.write_csv(pa.table(rows), tmp_path / "t.tsv", pcsv.WriteOptions(delimiter="\t"))
    pd.DataFrame(rows).to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    for name in ("t.csv", "t.tsv", "t.jsonl"):
        items = flat(tmp_path / name, batch_size=4)
        assert [it["image_url"] for it in items] == rows["image_url"], name
        assert [it["prompt"] for it in items] == rows["prompt"], name
        assert [it["metadata"]["note"] for it in items] == rows["note"], name
    assert detect_format(tmp_path / "t.tsv") == "tsv"


def test_limit_and_sample(tmp_path: Path) -> None:
    pq.write_table(pa.table({"url": [f"http://h/{i}.png" for i in range(1000)]}),
                   tmp_path / "t.parquet", row_group_size=100)
    first = flat(tmp_path / "t.parquet", limit=15, batch_size=10)
    assert [it["image_url"] for it in first] == [f"http://h/{i}.png" for i in range(15)]
    a = flat(tmp_path / "t.parquet", sample=50, seed=7)
    b = flat(tmp_path / "t.parquet", sample=50, seed=7)
    assert a == b and len(a) == 50
    idx = [int(it["image_url"].rsplit("/", 1)[1].split(".")[0]) for it in a]
    assert idx == sorted(idx) and len(set(idx)) == 50 and idx != list(range(50))


def test_webdataset_shards_from_the_webdataset_library(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    pattern = str(tmp_path / "shard-%02d.tar")
    with wds.ShardWriter(pattern, maxcount=10, verbose=0) as sink:
        for i in range(N):
            sink.write({"__key__": f"sample{i:04d}", "png": png(i), "txt": f"caption {i}",
                        "json": {"question": f"how many {i}?", "source": "unit"}})
    shards = sorted(tmp_path.glob("shard-*.tar"))
    assert len(shards) == 3
    items = flat(str(tmp_path / "shard-{00..02}.tar"), batch_size=8)
    assert [it["id"] for it in items] == [f"sample{i:04d}" for i in range(N)]
    assert [it["image_bytes"] for it in items] == [png(i) for i in range(N)]
    assert [it["question"] for it in items] == [f"how many {i}?" for i in range(N)]
    assert items[3]["metadata"] == {
        "__key__": "sample0003", "txt": "caption 3", "json": {"question": "how many 3?", "source": "unit"},
        "__shard__": "shard-00.tar"}
    assert flat(tmp_path, limit=3)[2]["id"] == "sample0002"  # a folder of shards
    with pytest.raises(InvalidRequest, match="no such file"):
        list(open_source(str(tmp_path / "shard-{00..05}.tar")))


def test_hf_save_to_disk_and_parquet_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"picture": datasets.Image(), "question": datasets.Value("string"),
                                  "label": datasets.Value("int64")})

    def split(n: int, offset: int) -> Any:
        return datasets.Dataset.from_dict({
            "picture": [Image.open(io.BytesIO(png(offset + i))) for i in range(n)],
            "question": [f"q{offset + i}" for i in range(n)],
            "label": [offset + i for i in range(n)],
        }, features=features)

    dd = datasets.DatasetDict({"train": split(N, 0), "test": split(5, 100)})
    dd.save_to_disk(str(tmp_path / "saved"))
    assert detect_format(tmp_path / "saved") == "hf"
    train = flat(tmp_path / "saved", batch_size=10)
    assert [it["question"] for it in train] == [f"q{i}" for i in range(N)]
    assert [it["metadata"]["label"] for it in train] == list(range(N))
    # The Image feature's bytes come through untouched (decoded, they are the same pixels).
    got = Image.open(io.BytesIO(train[4]["image_bytes"]))
    assert got.size == (6, 4) and got.getpixel((0, 0)) == (4, 10, 20)
    test = flat(tmp_path / "saved", split="test")
    assert [it["metadata"]["label"] for it in test] == list(range(100, 105))
    with pytest.raises(InvalidRequest, match="the splits are test, train"):
        list(open_source(tmp_path / "saved", split="validation"))

    # The Hub's parquet layout, written by datasets itself.
    (tmp_path / "hub" / "data").mkdir(parents=True)
    dd["train"].to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    dd["test"].to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
    hub_test = flat(tmp_path / "hub", split="test")
    assert [it["question"] for it in hub_test] == [f"q{i}" for i in range(100, 105)]
    hub_train = flat(tmp_path / "hub")
    assert Image.open(io.BytesIO(hub_train[0]["image_bytes"])).getpixel((0, 0)) == (0, 10, 20)


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="no such file"):
        list(open_source(tmp_path / "missing.parquet"))
    pq.write_table(pa.table({"a": ["http://h/1.png"], "b": [1]}), tmp_path / "t.parquet")
    with pytest.raises(InvalidRequest, match="no such column; the columns are a, b"):
        list(open_source(tmp_path / "t.parquet", image_col="nope"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.png").write_bytes(png(1))
    assert detect_format(tmp_path / "plain") is None
    with pytest.raises(InvalidRequest, match="not a dataset"):
        list(open_source(tmp_path / "plain"))
    (tmp_path / "empty.jsonl").write_text("")
    assert flat(tmp_path / "empty.jsonl") == []
    (tmp_path / "urls.txt").write_text("# comment\nhttp://h/1.png\n\nhttp://h/2.png\n")
    assert [it["image_url"] for it in flat(tmp_path / "urls.txt")] == [
        "http://h/1.png", "http://h/2.png"]
    assert json.dumps(flat(tmp_path / "t.parquet"))  # items are JSON-safe without image bytes
