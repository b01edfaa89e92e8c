"""Tensor shapes through every stage, KV-cache equivalence, import hygiene, tokenizer."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.decode import beam_search, greedy, sample
from pipeline.model import LoomShapesModel, parse_layout, text_batch
from pipeline.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup() -> tuple[LoomShapesModel, Tokenizer]:
    torch.manual_seed(0)
    tok = Tokenizer.build()
    return LoomShapesModel(ModelConfig(vocab_size=len(tok)), tok.numeric_start).eval(), tok


def test_stage_shapes(setup) -> None:
    m, tok = setup
    cfg = m.cfg
    B = 3
    with torch.no_grad():
        img = m.image_encoder(torch.zeros(B, 3, 64, 64))
        assert img.shape == (B, cfg.grid * cfg.grid, cfg.d_model)
        ids = text_batch(tok, ["what color is the circle?", "", "is there a red square?"], "vqa",
                         cfg.max_text_len, torch.device("cpu"))
        valid = ids != tok.pad_id
        text = m.text_encoder(ids, valid)
        assert text.shape == (B, ids.shape[1], cfg.d_model)
        z, zv = m.fusion(img, text, valid)
        assert z.shape == (B, 64 + ids.shape[1], cfg.d_model) and zv.shape == z.shape[:2]
        zg, zgv = m.fusion(None, text, valid)          # generate: z is the prompt encoding
        assert zg.shape == text.shape and torch.equal(zgv, valid)
        dec_in = torch.full((B, 5), tok.bos_id)
        assert m.decoder(dec_in, z, zv).shape == (B, 5, cfg.vocab_size)
        masks = m.renderer(torch.tensor([0, 1, 2]), torch.tensor([10.0, 20.0, 30.0]))
        assert masks.shape == (3, m.renderer.window, m.renderer.window)


def test_kv_cache_matches_full_forward(setup) -> None:
    m, tok = setup
    torch.manual_seed(1)
    z, zv = torch.randn(2, 7, m.cfg.d_model), torch.ones(2, 7, dtype=torch.bool)
    zv[1, 5:] = False
    seq = torch.randint(4, len(tok), (2, 6))
    with torch.no_grad():
        full = m.decoder(seq, z, zv)
        cache = m.decoder.init_cache(z, zv)
        steps = torch.stack([m.decoder.step(seq[:, t], t, cache) for t in range(6)], 1)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)


def test_decoders_batched(setup) -> None:
    m, tok = setup
    z, zv = torch.randn(4, 9, m.cfg.d_model), torch.ones(4, 9, dtype=torch.bool)
    with torch.no_grad():
        g = greedy(m.decoder, z, zv, tok.bos_id, tok.eos_id, max_len=8)
        b = beam_search(m.decoder, z, zv, tok.bos_id, tok.eos_id, beams=3, max_len=8)
        b1 = beam_search(m.decoder, z, zv, tok.bos_id, tok.eos_id, beams=1, max_len=8)
        gens = [torch.Generator().manual_seed(s) for s in range(4)]
        s = sample(m.decoder, z, zv, tok.bos_id, tok.eos_id, gens, max_len=8)
    assert g.shape[0] == b.shape[0] == s.shape[0] == 4
    assert torch.equal(b1, g)                           # one beam is greedy


def test_parse_layout_roundtrip() -> None:
    tok = Tokenizer.build()
    words = ["n60", "n61", "n62", "triangle", "n55", "n7", "n7", "n3", "n4", "n12"]
    bg, objs = parse_layout(tok, tok.encode(words) + [tok.eos_id])
    assert bg == (242, 246, 250) and objs == [(2, (222, 30, 30), 3, 4, 12)]


def test_tokenizer_json_roundtrip() -> None:
    tok = Tokenizer.build()
    again = Tokenizer.from_json(tok.to_json())
    assert again.tokens == tok.tokens
    ids = tok.encode("what color is the circle?")
    assert tok.decode(ids) == "what color is the circle?"
    assert tok.encode("a mauve blob")[1] == tok.index["<unk>"]


def test_config_json_roundtrip() -> None:
    cfg = ModelConfig(d_model=64, stem_channels=(8, 16))
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_pipeline_imports_stay_pure() -> None:
    probe = ("import sys, pipeline, pipeline.registry, pipeline.model, pipeline.train, pipeline.evaluate;"
             "bad = sorted({m.split('.')[0] for m in sys.modules} & {'loom','worker','api','celery',"
             "'sqlalchemy','boto3','fastapi','redis','transformers'}); print(bad)")
    out = subprocess.run([sys.executable, "-W", "error", "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"
    lazy = subprocess.run([sys.executable, "-c", "import sys, pipeline; print('torch' in sys.modules)"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    assert lazy.stdout.strip() == "False"


def test_tokenizer_names_the_words_it_cannot_read() -> None:
    tok = Tokenizer.build()
    assert tok.unknown_words("a small red circle to the left of a large blue square") == []
    assert tok.unknown_words("What color is the circle?") == []
    assert tok.unknown_words("what colour is an orange circle?") == []  # aliases
    assert tok.unknown_words("the quick brown fox, the quick dog") == ["quick", "brown", "fox",
                                                                        "dog"]
    # Task and layout tokens are the model's own, not words a prompt may use.
    assert tok.unknown_words("<generate> n12 circle") == ["<generate>", "n"]
    assert tok.unknown_words("1234 !!") == ["1234", "!!"]  # nothing the tokenizer reads at all
    vocab = tok.word_vocabulary()
    assert {"circle", "?", "yes"} <= vocab and not vocab & {"<pad>", "n0", "<caption>"}
