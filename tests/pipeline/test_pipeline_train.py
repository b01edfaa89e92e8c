"""One optimisation step lowers the loss on a fixed batch; checkpoints round-trip."""
from __future__ import annotations

import random
from pathlib import Path

import torch

from pipeline import checkpoint, train
from pipeline.config import ModelConfig
from pipeline.model import LoomShapesModel
from pipeline.tokenizer import Tokenizer


def _small() -> tuple[LoomShapesModel, Tokenizer]:
    torch.manual_seed(0)
    tok = Tokenizer.build()
    cfg = ModelConfig(vocab_size=len(tok), d_model=64, stem_channels=(16, 32), decoder_layers=1,
                      text_layers=1)
    return LoomShapesModel(cfg, tok.numeric_start), tok


def test_one_step_lowers_loss() -> None:
    model, tok = _small()
    bank = train.MaskBank(model.renderer.window, model.renderer.MARGIN)
    b = train.make_batch(tok, model.cfg, bank, random.Random(0), 8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    before = {k: v.item() for k, v in model.losses(b, tok.pad_id).items()}
    for _ in range(2):
        loss = sum(model.losses(b, tok.pad_id).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = {k: v.item() for k, v in model.losses(b, tok.pad_id).items()}
    assert sum(after.values()) < sum(before.values())
    for task in ("caption", "vqa", "generate"):
        assert after[task] < before[task], (task, before, after)


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    model, tok = _small()
    path = tmp_path / "m.safetensors"
    sha = checkpoint.save(path, model, tok, "tiny", "t1")
    assert sha == checkpoint.sha256_file(path)
    again, tok2, meta = checkpoint.load(path)
    assert meta["name"] == "tiny" and tok2.tokens == tok.tokens and again.cfg == model.cfg
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_train_resumes(tmp_path: Path) -> None:
    tok = Tokenizer.build()
    cfg = ModelConfig(vocab_size=len(tok), d_model=32, n_heads=2, stem_channels=(8, 16),
                      decoder_layers=1, text_layers=1)
    logs: list[str] = []
    kw = dict(out=tmp_path / "w.safetensors", run_dir=tmp_path / "run", batch=4, eval_every=0,
              ckpt_every=1, cfg=cfg, log=logs.append, threads=torch.get_num_threads())
    train.train(steps=2, **kw)
    train.train(steps=3, **kw)
    assert any("resumed" in m and "step 2" in m for m in logs)
    assert (tmp_path / "w.safetensors").is_file()
