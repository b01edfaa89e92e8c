"""Fine-tuning: the extension world, vocabulary growth, and a run that resumes where it stopped."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import checkpoint, data, finetune
from pipeline.render_alt import render_alt
from test_pipeline_train import _small  # the same small model the training tests use


def test_the_extension_world_draws_its_new_colours_and_shape() -> None:
    rng = random.Random(3)
    scenes = [data.sample_scene(rng, world=data.EXTENDED) for _ in range(300)]
    objs = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == {"circle", "square", "triangle", "diamond"}
    assert {"pink", "cyan"} <= {o.colour for o in objs}
    # The base world's stream is unchanged by the world parameter.
    a, b = random.Random(5), random.Random(5)
    assert data.sample_scene(a) == data.sample_scene(b, world=data.BASE)
    # "is there a pink diamond?" is asked in the extension world only.
    scene = data.Scene((255, 255, 255), (data.Obj("circle", "red", (220, 30, 30), 5, 5, 20),))
    ext = {q for q, _ in data.questions(scene, data.EXTENDED)["exists"]}
    assert "is there a pink diamond?" in ext
    assert "is there a pink diamond?" not in {q for q, _ in data.questions(scene)["exists"]}


@pytest.mark.parametrize("draw", [lambda s: data.render(s), lambda s: render_alt(s)])
def test_a_diamond_covers_the_l1_ball_of_its_box(draw) -> None:  # type: ignore[no-untyped-def]
    o = data.Obj("diamond", "cyan", (40, 190, 210), 12, 12, 40)
    img = np.asarray(draw(data.Scene((255, 255, 255), (o,))), dtype=np.int32)
    cyan = (np.abs(img - np.array(o.rgb)).sum(-1) < 60)
    assert cyan[32, 32] and cyan[32, 14] and cyan[14, 32]  # centre and near two vertices
    assert not cyan[14, 14] and not cyan[50, 50]  # the box's corners stay background
    assert 0.4 < cyan.sum() / (40 * 40) < 0.6  # half the box


def test_growing_the_vocabulary_keeps_what_the_model_said() -> None:
    model, tok = _small()
    model.eval()
    ids = torch.tensor([[tok.bos_id, tok.index["a"], tok.index["red"]]])
    z = torch.randn(1, 5, model.cfg.d_model)
    valid = torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        before = model.decoder(ids, z, valid)
    grown, added = finetune.grow_vocabulary(model, tok, ["a", "pink", "diamond", "pink", "n3"])
    assert added == ["pink", "diamond"]
    assert grown.tokens[: len(tok)] == tok.tokens and grown.numeric_start == tok.numeric_start
    assert grown.unknown_words("a small pink diamond") == []
    assert model.cfg.vocab_size == len(grown) == model.decoder.head.out_features
    with torch.no_grad():
        after = model.decoder(ids, z, valid)
    assert torch.allclose(after[..., : len(tok)], before, atol=1e-5)
    assert after.shape[-1] == len(tok) + 2


def test_a_stopped_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    rows = finetune.labelled_rows(12, seed=0)
    hyper = finetune.Hyper(steps=4, batch=4, replay=2, ckpt_every=2, warmup=1)

    model, tok = _small()
    straight, tok_a, done = finetune.finetune(model, tok, rows, hyper=hyper,
                                              run_dir=tmp_path / "a")
    assert done

    model, tok = _small()
    seen: list[int] = []
    _, _, done = finetune.finetune(model, tok, rows, hyper=hyper, run_dir=tmp_path / "b",
                                   on_progress=lambda p: seen.append(p.step),
                                   should_stop=lambda: len(seen) >= 2)
    assert not done and seen == [1, 2]
    model, tok = _small()  # a new process: the base again, then the checkpoint
    resumed, tok_b, done = finetune.finetune(model, tok, rows, hyper=hyper,
                                             run_dir=tmp_path / "b",
                                             on_progress=lambda p: seen.append(p.step))
    assert done and seen == [1, 2, 3, 4]
    assert tok_b.tokens == tok_a.tokens and {"pink", "diamond", "cyan"} & set(tok_b.tokens)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_fine_tuned_model_saves_and_loads_with_its_vocabulary(tmp_path: Path) -> None:
    model, tok = _small()
    model, tok, _ = finetune.finetune(model, tok, finetune.labelled_rows(8, seed=1),
                                      hyper=finetune.Hyper(steps=1, batch=2, replay=1),
                                      run_dir=tmp_path / "run")
    path = tmp_path / "ft.safetensors"
    checkpoint.save(path, model, tok, "mine", "v1")
    loaded, tok2, meta = checkpoint.load(path)
    assert tok2.tokens == tok.tokens and meta["name"] == "mine"
    assert loaded.decoder.head.out_features == len(tok)


def test_no_rows_is_an_error(tmp_path: Path) -> None:
    model, tok = _small()
    with pytest.raises(ValueError, match="no labelled rows"):
        finetune.finetune(model, tok, [], run_dir=tmp_path)
