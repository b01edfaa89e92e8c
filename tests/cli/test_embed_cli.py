"""``loom embed``, ``loom dedupe`` and ``loom search`` through the real console script (SQLite
and a local store under a temporary LOOM_HOME, the real model in-process)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from test_cli import home, job_ids, loom, rows  # noqa: F401  (home is a fixture)


@pytest.fixture(scope="module")
def folder(home: Path) -> tuple[Path, list[str]]:  # noqa: F811
    """Six scenes with distinct captions, a byte copy of scene 0 and a JPEG q70 of scene 1."""
    from pipeline import data, train_embed

    rng = random.Random(99)
    d = home / "shots"
    d.mkdir()
    caps: list[str] = []
    while len(caps) < 6:
        s = data.sample_scene(rng)
        if data.caption(s) in caps:
            continue
        data.render(s).save(d / f"scene_{len(caps)}.png")
        caps.append(data.caption(s))
    shutil.copy(d / "scene_0.png", d / "copy_of_0.png")
    from PIL import Image

    train_embed.jpeg(Image.open(d / "scene_1.png").convert("RGB"), 70).save(
        d / "scene_1.jpg", quality=95)
    return d, caps


def test_embed_dedupe_and_search(home: Path, folder: tuple[Path, list[str]]) -> None:  # noqa: F811
    d, caps = folder
    out = home / "vectors.jsonl"
    proc = loom(home, "embed", str(d), "--out", str(out))
    assert "8 succeeded" in proc.stdout
    got = {r["file"]: r for r in rows(out)}
    assert len(got) == 8 and all(r["vector"].endswith(".npy") for r in got.values())
    job = job_ids(home)["embed"][0]

    groups = home / "groups.parquet"
    proc = loom(home, "dedupe", job, "--out", str(groups))
    assert "8 vectors: 2 groups, 2 duplicates to drop (1 exact, 1 near)" in proc.stdout
    recs = pq.read_table(groups).to_pylist()
    by_group: dict[int, list[tuple[str, str]]] = {}
    for r in recs:
        by_group.setdefault(r["group"], []).append((r["file"], r["match"]))
    assert sorted(sorted(g) for g in by_group.values()) == [
        [("copy_of_0.png", "exact"), ("scene_0.png", "first")],
        [("scene_1.jpg", "near"), ("scene_1.png", "first")],
    ] or sorted(sorted(g) for g in by_group.values()) == [
        [("copy_of_0.png", "first"), ("scene_0.png", "exact")],
        [("scene_1.jpg", "first"), ("scene_1.png", "near")],
    ]
    jl = home / "groups.jsonl"
    loom(home, "dedupe", job, "--threshold", "1.0", "--out", str(jl))
    assert {r["file"] for r in rows(jl)} == {"scene_0.png", "copy_of_0.png"}

    for i in (3, 5):
        proc = loom(home, "search", caps[i], "--in", job, "-k", "3", "--json")
        hits = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [h["rank"] for h in hits] == [1, 2, 3]
        assert hits[0]["file"] == f"scene_{i}.png", (caps[i], hits)
        assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    proc = loom(home, "search", caps[2], "--in", job, "-k", "2")
    assert "scene_2.png" in proc.stdout.splitlines()[0]


def test_dedupe_and_search_refuse_clearly(home: Path) -> None:  # noqa: F811
    proc = loom(home, "dedupe", ok=False)
    assert proc.returncode != 0 and "JOB id or --table" in proc.stderr
    proc = loom(home, "dedupe", "no-such-job", ok=False)
    assert proc.returncode != 0 and "no job no-such-job" in proc.stderr
    (home / "cap.png").write_bytes((Path(__file__).parents[2] / "examples" / "images" /
                                    "scene_03.png").read_bytes())
    loom(home, "caption", str(home / "cap.png"), "--out", str(home / "c.jsonl"))
    cap_job = job_ids(home)["caption"][0]
    proc = loom(home, "search", "a red circle", "--in", cap_job, ok=False)
    assert proc.returncode != 0 and "embed job" in proc.stderr
    proc = loom(home, "dedupe", "--table", str(home / "c.jsonl"), ok=False)
    assert proc.returncode != 0 and "vector" in proc.stderr


def test_vectors_export_as_a_parquet_list_column_and_npy_members(
    home: Path, folder: tuple[Path, list[str]],  # noqa: F811
) -> None:
    """Vectors are stored compactly (.npy, float32) and exported as a Parquet list<float32>
    column and as ``{key}.npy`` in WebDataset shards."""
    import io
    import tarfile

    import numpy as np

    d, _ = folder
    loom(home, "embed", str(d), "--out", str(home / "v.parquet"))
    table = pq.read_table(home / "v.parquet")
    import pyarrow as pa

    field = table.schema.field("vector").type
    assert pa.types.is_list(field) and field.value_type == pa.float32()
    vecs = [np.asarray(v, dtype=np.float32) for v in table.column("vector").to_pylist()]
    assert len(vecs) == 8 and {v.shape for v in vecs} == {(128,)}
    assert all(abs(float(np.linalg.norm(v)) - 1.0) < 1e-3 for v in vecs)
    job = job_ids(home)["embed"][0]
    loom(home, "results", job, "--format", "webdataset", "-o", str(home / "v.tar"))
    with tarfile.open(home / "v.tar") as tar:
        npys = {m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".npy")}
    assert len(npys) == 8
    first = np.load(io.BytesIO(npys[sorted(npys)[0]]), allow_pickle=False)
    assert first.dtype == np.float32 and np.allclose(first, vecs[0])
