"""loom.vectors: duplicate grouping and text-to-image ranking on real loom-shapes vectors (the
model embeds rendered scenes here), plus the table formats and the index path."""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixtures_worker import require_model
from loom import vectors
from loom.errors import InvalidRequest


@pytest.fixture(scope="module")
def model() -> Any:
    require_model()
    import torch

    from pipeline import registry

    torch.set_num_threads(1)
    return registry.load("loom-shapes", device="cpu")


@pytest.fixture(scope="module")
def scenes(model: Any) -> dict[str, Any]:
    """12 scenes with distinct captions; per scene the plain render, its JPEG q70 copy and the
    scene with one object moved by 9-16 px. Row 3i, 3i+1, 3i+2; one byte-identical copy last."""
    from pipeline import data, train_embed

    rng = random.Random(4242)
    picked: list[Any] = []
    while len(picked) < 12:
        s = data.sample_scene(rng)
        if data.caption(s) not in {data.caption(p) for p in picked} and \
                train_embed.shift_object(s, random.Random(1)) is not None:
            picked.append(s)
    images, shas, files = [], [], []
    for i, s in enumerate(picked):
        plain = data.render(s)
        moved = train_embed.shift_object(s, rng)
        assert moved is not None
        for name, im in (("plain", plain), ("jpeg", train_embed.jpeg(plain, 70)),
                         ("moved", data.render(moved))):
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            images.append(im)
            shas.append(hashlib.sha256(buf.getvalue()).hexdigest())
            files.append(f"{i:02d}-{name}.png")
    images.append(images[0])
    shas.append(shas[0])
    files.append("00-copy.png")
    table = vectors.make_table(model.embed(images), files=files, sha256=shas)
    return {"table": table, "captions": [data.caption(s) for s in picked]}


def test_near_duplicates_group_and_moved_scenes_stay_apart(scenes: dict[str, Any]) -> None:
    table = scenes["table"]
    groups = vectors.group(table)
    by_row = {r: g for g in groups for r in g.rows}
    for i in range(12):
        plain, jpeg, moved = 3 * i, 3 * i + 1, 3 * i + 2
        assert plain in by_row and jpeg in by_row[plain].rows, table.files[plain]
        assert moved not in by_row[plain].rows, table.files[moved]
    first = by_row[0]
    assert first.rows == [0, 1, 36] and first.id == 0
    assert first.exact == [True, False, True]          # the byte copy by sha256, jpeg by cosine
    recs = [r for r in vectors.group_records(table, groups) if r["group"] == 0]
    assert [(r["file"], r["match"], r["keep"]) for r in recs] == [
        ("00-plain.png", "first", True), ("00-jpeg.png", "near", False),
        ("00-copy.png", "exact", False)]
    assert recs[1]["score"] >= vectors.DEFAULT_THRESHOLD and recs[2]["score"] == pytest.approx(1.0)


def test_exact_duplicates_group_even_below_the_threshold(scenes: dict[str, Any]) -> None:
    table = scenes["table"]
    groups = vectors.group(table, threshold=1.0)      # nothing is near enough: only the sha
    assert [g.rows for g in groups] == [[0, 36]]


def test_text_query_ranks_its_scene_first(scenes: dict[str, Any], model: Any) -> None:
    table = scenes["table"]
    plain = vectors.make_table(table.vectors[0:36:3], files=table.files[0:36:3])
    queries = model.embed_text(scenes["captions"])
    for i, q in enumerate(queries):
        hits = vectors.rank(plain, q, k=3)
        assert hits[0][0] == i, (scenes["captions"][i], [plain.files[r] for r, _ in hits])
        assert hits[0][1] > hits[1][1] >= hits[2][1]


def test_faiss_index_finds_the_brute_force_pairs(scenes: dict[str, Any]) -> None:
    pytest.importorskip("faiss")
    v = scenes["table"].vectors
    for thr in (0.8, 0.9):
        brute = {(a, b) for i, j, _ in vectors.brute_pairs(v, thr, block=7)
                 for a, b in zip(i.tolist(), j.tolist())}
        index = {(a, b) for i, j, _ in vectors.faiss_pairs(v, thr)
                 for a, b in zip(i.tolist(), j.tolist())}
        assert brute and index == brute


def test_groups_are_transitive_and_blocks_do_not_matter() -> None:
    # a ~ b (cos 0.95), b ~ c (0.95), a vs c 0.81: one group through b; d alone
    ang = np.arccos(0.95)
    v = np.array([[1, 0], [np.cos(ang), np.sin(ang)], [np.cos(2 * ang), np.sin(2 * ang)],
                  [-1, 0]], dtype=np.float32)
    t = vectors.make_table(v)
    assert [g.rows for g in vectors.group(t, 0.9)] == [[0, 1, 2]]
    pairs = [sorted(zip(i.tolist(), j.tolist())) for i, j, _ in vectors.brute_pairs(t.vectors, 0.9,
                                                                                     block=1)]
    assert sorted(p for ps in pairs for p in ps) == [(0, 1), (1, 2)]


def test_tables_round_trip_and_bad_input(tmp_path: Path, scenes: dict[str, Any]) -> None:
    table = scenes["table"]
    rows = [{"index": i, "file": f, "sha256": s, "vector": v.tolist()}
            for i, (f, s, v) in enumerate(zip(table.files, table.sha256, table.vectors))]
    jl = tmp_path / "v.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pqf = tmp_path / "v.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pqf)
    for path in (jl, pqf):
        back = vectors.read_table(path)
        assert back.files == table.files and back.sha256 == table.sha256
        np.testing.assert_allclose(back.vectors, table.vectors, atol=1e-6)
    groups = vectors.group(table)
    n = vectors.write_groups(table, groups, tmp_path / "g.parquet")
    assert n == sum(len(g.rows) for g in groups)
    assert pq.read_table(tmp_path / "g.parquet").column("file").to_pylist()[:3] == [
        "00-plain.png", "00-jpeg.png", "00-copy.png"]
    (tmp_path / "bad.jsonl").write_text('{"file": "x"}\n')
    with pytest.raises(InvalidRequest, match="no 'vector'"):
        vectors.read_table(tmp_path / "bad.jsonl")
    with pytest.raises(InvalidRequest, match="threshold"):
        vectors.group(table, threshold=1.5)
    with pytest.raises(InvalidRequest, match="method"):
        vectors.group(table, method="annoy")
    with pytest.raises(InvalidRequest, match="dimensions"):
        vectors.rank(table, np.ones(3), k=1)
    assert vectors.rank(vectors.make_table([]), np.ones(3)) == []
    assert vectors.group(vectors.make_table([])) == []
