"""Results join back to the user's rows (loom.datasets.columns): every input column kept under its
own name and type, the image column as given, one row per input row in input order (a failed row
included, with status, error_code and error_message), Loom's columns prefixed loom_ where the
user's table has the name. Parquet, CSV, JSONL, a Hugging Face dataset and WebDataset shards in,
through the real embedded CLI and the real model; read back with pyarrow, csv and datasets."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_cli import loom, rows
from test_cli_datasets import scenes

N = 5
BAD = 2  # the row in the middle whose image is not an image


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fixtures_worker import require_model

    require_model()
    return tmp_path_factory.mktemp("loom-columns")


@pytest.fixture(scope="module")
def truth() -> list[tuple[bytes, str]]:
    return scenes(N, seed=7)


def images(truth: list[tuple[bytes, str]]) -> list[bytes]:
    return [b"this is no image" if i == BAD else png for i, (png, _) in enumerate(truth)]


def files(home: Path, truth: list[tuple[bytes, str]]) -> list[str]:
    """The images as files beside the tables, named as a table names them (relative)."""
    (home / "imgs").mkdir(exist_ok=True)
    names = []
    for i, data in enumerate(images(truth)):
        (home / "imgs" / f"p{i}.png").write_bytes(data)
        names.append(f"imgs/p{i}.png")
    return names


def check_rows(got: list[dict[str, Any]], truth: list[tuple[bytes, str]], *, uid: list[Any],
               caption_col: str, status_col: str = "loom_status") -> None:
    """One row per input row, in input order; the failed one present; the user's ``status``
    column kept as it was, Loom's beside it under ``status_col``."""
    assert len(got) == N
    assert [r["uid"] for r in got] == uid
    assert [r["status"] for r in got] == [f"user-{i}" for i in range(N)]
    assert [r[status_col] for r in got] == [
        "failed" if i == BAD else "succeeded" for i in range(N)]
    bad = got[BAD]
    assert bad["error_code"] == "invalid_input" and "image" in bad["error_message"]
    assert bad[caption_col] is None
    right = sum(r[caption_col] == c for i, (r, (_, c)) in enumerate(zip(got, truth)) if i != BAD)
    assert right >= N - 2, f"{right}/{N - 1} captions right"


def test_parquet_keeps_types_order_bytes_and_a_failed_row(
    home: Path, truth: list[tuple[bytes, str]]
) -> None:
    table = pa.table({
        "uid": pa.array([100 + i for i in range(N)], pa.int64()),
        "img": pa.array(images(truth), pa.binary()),
        "status": [f"user-{i}" for i in range(N)],  # collides with Loom's status
        "score": pa.array([i / 2 for i in range(N)], pa.float32()),
    })
    pq.write_table(table, home / "in.parquet")
    proc = loom(home, "caption", str(home / "in.parquet"), "--image-col", "img", "--id-col",
                "uid", "--out", str(home / "out.parquet"), ok=False)
    assert proc.returncode == 3, proc.stderr  # one row failed
    out = pq.read_table(home / "out.parquet")
    assert out.schema.names[:4] == ["uid", "img", "status", "score"]
    assert [out.schema.field(n).type for n in ("uid", "img", "score")] == [
        pa.int64(), pa.binary(), pa.float32()]
    assert "loom_status" in out.schema.names and "id" not in out.schema.names
    got = out.to_pylist()
    check_rows(got, truth, uid=[100 + i for i in range(N)], caption_col="text")
    assert [r["img"] for r in got] == images(truth)  # the bytes the user gave, the bad ones too

    # --drop-images: the same table without the image column.
    loom(home, "caption", str(home / "in.parquet"), "--image-col", "img", "--id-col", "uid",
         "--drop-images", "--out", str(home / "slim.parquet"), ok=False)
    slim = pq.read_table(home / "slim.parquet")
    assert "img" not in slim.schema.names and slim.schema.names[:3] == ["uid", "status", "score"]
    assert slim.num_rows == N


def test_csv_keeps_the_path_as_given(home: Path, truth: list[tuple[bytes, str]]) -> None:
    names = files(home, truth)
    with (home / "in.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uid", "path", "status"])
        w.writerows([f"u{i}", names[i], f"user-{i}"] for i in range(N))
    loom(home, "caption", str(home / "in.csv"), "--image-col", "path", "--id-col", "uid",
         "--out", str(home / "out.csv"), ok=False)
    got = list(csv.DictReader(io.StringIO((home / "out.csv").read_text())))
    assert list(got[0])[:3] == ["uid", "path", "status"]
    assert [r["path"] for r in got] == names  # relative, as the table has it
    for r in got:  # CSV has no nulls: empty cells
        r.update({k: (v or None) for k, v in r.items()})
    check_rows(got, truth, uid=[f"u{i}" for i in range(N)], caption_col="loom_caption"
               if "loom_caption" in got[0] else "caption")


def test_jsonl_and_parquet_out_of_a_jsonl_table(
    home: Path, truth: list[tuple[bytes, str]]
) -> None:
    names = files(home, truth)
    with (home / "in.jsonl").open("w") as f:
        for i in range(N):
            f.write(json.dumps({"uid": 10 * i, "file_name": names[i], "status": f"user-{i}",
                                "caption": f"old {i}"}) + "\n")
    loom(home, "caption", str(home / "in.jsonl"), "--image-col", "file_name", "--id-col", "uid",
         "--out", str(home / "out.jsonl"), ok=False)
    got = rows(home / "out.jsonl")
    assert list(got[0])[:4] == ["uid", "file_name", "status", "caption"]
    assert [r["caption"] for r in got] == [f"old {i}" for i in range(N)]  # the user's, kept
    check_rows(got, truth, uid=[10 * i for i in range(N)], caption_col="loom_caption")
    # The same job's results again, as a Parquet table: the int id stays an int.
    job_id = _last_job(home)
    loom(home, "results", job_id, "--format", "parquet", "-o", str(home / "again.parquet"))
    again = pq.read_table(home / "again.parquet")
    assert again.schema.field("uid").type == pa.int64()
    assert again.column("uid").to_pylist() == [10 * i for i in range(N)]


def _last_job(home: Path) -> str:
    out = loom(home, "jobs").stdout
    return next(line.split()[0] for line in out.splitlines() if len(line.split()[0]) >= 26)


def test_hf_dataset_in_and_out(home: Path, truth: list[tuple[bytes, str]]) -> None:
    import datasets

    ds = datasets.Dataset.from_dict(
        {"uid": [f"h{i}" for i in range(N)],
         "image": [{"bytes": b, "path": None} for b in images(truth)],
         "status": [f"user-{i}" for i in range(N)]},
        features=datasets.Features({"uid": datasets.Value("string"), "image": datasets.Image(),
                                    "status": datasets.Value("string")}))
    ds.save_to_disk(str(home / "hf-in"))
    loom(home, "caption", str(home / "hf-in"), "--id-col", "uid", "--format", "hf",
         "--out", str(home / "hf-out"), ok=False)
    back = datasets.load_dataset("parquet", data_dir=str(home / "hf-out" / "data"),
                                 split="train")
    assert back.column_names[:3] == ["uid", "image", "status"]
    assert isinstance(back.features["image"], datasets.Image)
    got = back.to_list()
    check_rows(got, truth, uid=[f"h{i}" for i in range(N)], caption_col="text")
    assert got[0]["image"]["bytes"] == truth[0][0]


def test_webdataset_shards_keep_the_key_and_members(
    home: Path, truth: list[tuple[bytes, str]]
) -> None:
    import tarfile

    shard = home / "cols-00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, data in enumerate(images(truth)):
            meta = json.dumps({"uid": f"w{i}", "status": f"user-{i}"}).encode()
            for name, body in ((f"s{i:03d}.png", data), (f"s{i:03d}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    loom(home, "caption", str(shard), "--id-col", "uid", "--out", str(home / "wds.jsonl"),
         ok=False)
    got = rows(home / "wds.jsonl")
    assert list(got[0])[:3] == ["__key__", "png", "json"]
    assert [r["__key__"] for r in got] == [f"s{i:03d}" for i in range(N)]
    assert [base64.b64decode(r["png"]) for r in got] == images(truth)
    assert [r["json"] for r in got] == [{"uid": f"w{i}", "status": f"user-{i}"}
                                        for i in range(N)]
    # "status" is a key of the json member, not a column: Loom's own needs no prefix.
    assert [r["status"] for r in got] == ["failed" if i == BAD else "succeeded" for i in range(N)]
    assert got[BAD]["error_code"] == "invalid_input" and got[BAD]["caption"] is None
