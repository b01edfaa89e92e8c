"""The shipped embed head on fresh seeded scenes: the issue's quality floors (with margins, on a
smaller sample than the 1,000-scene figures of ``python -m pipeline.train_embed --eval``), the
vector's shape, batch independence, and the head's sha256 pinning."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import data, registry, train_embed
from pipeline.errors import WeightsMismatchError

N = 200
SEED = 555_013           # head training draws from Random(0); the figures from Random(10_000)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return registry.load("loom-shapes", device="cpu")


def test_quality_floors(model) -> None:
    rep = train_embed.measure(model, N, SEED)
    # 99% in the issue on >= 1,000 scenes; the floors here leave room for a 200-scene sample
    assert rep["near_duplicate_rate"] >= 0.98, rep
    assert rep["distinct_rate"] >= 0.98, rep
    assert rep["retrieval_top1"] >= 0.95, rep
    assert rep["near_duplicate_pairs"] == 4 * N and rep["distinct_pairs"] >= 5 * N


def test_vectors_are_fixed_size_unit_and_batch_independent(model) -> None:
    rng = random.Random(SEED + 1)
    images = [data.render(data.sample_scene(rng)) for _ in range(5)]
    images.append(images[0].convert("RGBA").resize((200, 200)))   # any size and mode
    batch = model.embed(images)
    assert [v.shape for v in batch] == [(128,)] * 6 and all(v.dtype == np.float32 for v in batch)
    np.testing.assert_allclose([np.linalg.norm(v) for v in batch], 1.0, atol=1e-5)
    alone = model.embed(images[2:3])[0]
    np.testing.assert_allclose(alone, batch[2], atol=1e-5)
    assert model.embed([]) == [] and model.embed_text([]) == []
    text = model.embed_text(["a small red circle above a large blue square"])[0]
    assert text.shape == (128,) and np.allclose(text[64:], 0)   # ranks by the semantic half


def test_scene_variants_keep_or_change_the_caption() -> None:
    rng = random.Random(SEED + 2)
    for _ in range(50):
        s = data.sample_scene(rng)
        moved = train_embed.shift_object(s, rng)
        if moved is not None:
            assert data.caption(moved) == data.caption(s) and train_embed.valid(moved)
            d = [np.hypot(a.x0 - b.x0, a.y0 - b.y0) for a, b in zip(s.objects, moved.objects)]
            assert max(d) > 8
        for kind in ("shape", "colour", "size"):
            other = train_embed.change_attribute(s, rng, kind)
            assert other is None or data.caption(other) != data.caption(s)


def test_tampered_head_is_refused(tmp_path: Path) -> None:
    entry = registry.get("loom-shapes")
    copy = tmp_path / "head.safetensors"
    shutil.copyfile(entry.embed_head, copy)
    raw = bytearray(copy.read_bytes())
    raw[-10] ^= 0x01
    copy.write_bytes(bytes(raw))
    from dataclasses import replace

    with pytest.raises(WeightsMismatchError, match="expected sha256"):
        registry.load_entry(replace(entry, embed_head=copy), device="cpu")


def test_control_plane_knows_what_the_model_serves(model) -> None:
    from loom import tasks

    caps = tasks.BUILTIN_MODELS["loom-shapes"]
    assert caps.tasks == model.info.tasks
    for task in caps.tasks:
        assert tuple(caps.params.get(task, ())) == tuple(model.info.params.get(task, ()))
    spec = tasks.get("embed")
    assert spec.output == "vector" and spec.image and not spec.texts and spec.method == "embed"
