"""Fine-tuning loom-shapes on labelled rows: new words, caption + VQA, no forgetting, resumable.

A user's table brings images with captions and/or question + answer pairs, possibly in words the
base model has never seen ("a small pink diamond"). ``finetune``:

1. grows the vocabulary: each new word gets a row in both token embeddings and in the decoder's
   output head, initialised from the mean of the existing word rows (a neutral start); the
   numeric layout tokens keep their ids, so generate is untouched;
2. trains caption and VQA on the user's rows, each step mixed with a replay batch of the base
   world (every loss the base model was trained with), so what it knew stays known;
3. checkpoints to ``run_dir`` every ``ckpt_every`` steps (model, optimiser, step, vocabulary):
   a run killed at any point resumes from the last checkpoint with the same batches it would
   have drawn (each step's sampling is seeded by the step number).

Pure PyTorch on rows in memory: reading tables and storing weights is the worker's business.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline import data
from pipeline.model import LoomShapesModel, text_batch
from pipeline.preprocess import resize_to_model
from pipeline.tokenizer import Tokenizer
from pipeline.train import MaskBank, _seq_tensors, lr_at, make_batch


@dataclass
class Row:
    """One labelled example: an image with a caption, a question + answer, or both."""

    image: Image.Image
    caption: str | None = None
    question: str | None = None
    answer: str | None = None


@dataclass
class Hyper:
    steps: int = 1500
    lr: float = 1e-3
    batch: int = 32  # user rows per step (caption and VQA rows each)
    replay: int = 16  # base-world scenes per step (all base losses)
    warmup: int = 50
    seed: int = 0
    ckpt_every: int = 100
    threads: int | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Progress:
    step: int
    steps: int
    loss: float
    losses: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def words_of(rows: Sequence[Row], tok: Tokenizer) -> list[str]:
    """The words the rows use (in first-seen order)."""
    seen: dict[str, None] = {}
    for r in rows:
        for text in (r.caption, r.question, r.answer):
            if text:
                seen.update(dict.fromkeys(tok.split(text)))
    return list(seen)


def grow_vocabulary(model: LoomShapesModel, tok: Tokenizer,
                    words: Sequence[str]) -> tuple[Tokenizer, list[str]]:
    """Add ``words`` the tokenizer lacks; resize the token embeddings and the output head in
    place. Returns the new tokenizer and the words added."""
    known = tok.word_vocabulary()
    added = [w for w in dict.fromkeys(words) if w not in tok.index and w not in known]
    if not added:
        return tok, []
    new_tok = Tokenizer(tok.tokens + added, tok.n_numeric)
    word_ids = torch.tensor([tok.index[w] for w in sorted(known)])
    v = len(new_tok)

    def grow_embedding(emb: nn.Embedding) -> nn.Embedding:
        out = nn.Embedding(v, emb.embedding_dim, padding_idx=emb.padding_idx)
        with torch.no_grad():
            out.weight[: emb.num_embeddings] = emb.weight
            out.weight[emb.num_embeddings:] = emb.weight[word_ids].mean(0)
        return out

    def grow_head(head: nn.Linear) -> nn.Linear:
        out = nn.Linear(head.in_features, v)
        with torch.no_grad():
            out.weight[: head.out_features] = head.weight
            out.weight[head.out_features:] = head.weight[word_ids].mean(0)
            out.bias[: head.out_features] = head.bias
            out.bias[head.out_features:] = head.bias[word_ids].mean()
        return out

    model.text_encoder.tok = grow_embedding(model.text_encoder.tok)
    model.decoder.tok = grow_embedding(model.decoder.tok)
    model.decoder.head = grow_head(model.decoder.head)
    # A word has no numeric value: its row of the value features stays zero.
    feats = model.decoder.num_feats
    model.decoder.register_buffer(
        "num_feats", torch.cat([feats, feats.new_zeros(v - feats.shape[0], feats.shape[1])]),
        persistent=False)
    model.cfg = replace(model.cfg, vocab_size=v)
    for module in model.modules():
        if getattr(module, "cfg", None) is not None and module is not model:
            module.cfg = model.cfg
    return new_tok, added


def _floats(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1], as preprocess.to_array does."""
    return pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _user_batch(tok: Tokenizer, model: LoomShapesModel, rows: Sequence[Row], pixels: torch.Tensor,
                rng: random.Random, n: int) -> dict[str, torch.Tensor]:
    """Caption rows and QA rows, ``n`` of each kind (with replacement when there are fewer)."""
    cpu = torch.device("cpu")
    cfg = model.cfg
    b: dict[str, torch.Tensor] = {}
    caps = [i for i, r in enumerate(rows) if r.caption]
    qas = [i for i, r in enumerate(rows) if r.question and r.answer]
    if caps:
        pick = [rng.choice(caps) for _ in range(n)]
        b["cap_pixels"] = _floats(pixels[pick])
        b["cap_text"] = text_batch(tok, [""] * n, "caption", cfg.max_text_len, cpu)
        b["cap_in"], b["cap_out"] = _seq_tensors(tok, [tok.split(rows[i].caption or "")
                                                       for i in pick])
    if qas:
        pick = [rng.choice(qas) for _ in range(n)]
        b["vqa_pixels"] = _floats(pixels[pick])
        b["vqa_text"] = text_batch(tok, [rows[i].question or "" for i in pick], "vqa",
                                   cfg.max_text_len, cpu)
        b["vqa_in"], b["vqa_out"] = _seq_tensors(tok, [tok.split(rows[i].answer or "")
                                                       for i in pick])
    return b


def _user_losses(model: LoomShapesModel, b: dict[str, torch.Tensor], pad: int
                 ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for kind in ("cap", "vqa"):
        if f"{kind}_pixels" not in b:
            continue
        img = model.image_encoder(b[f"{kind}_pixels"])
        text = b[f"{kind}_text"]
        z, z_valid = model.context(img, text, text != pad)
        out[f"user_{kind}"] = model.seq_loss(z, z_valid, b[f"{kind}_in"], b[f"{kind}_out"], pad)
    return out


def _save(path: Path, model: LoomShapesModel, tok: Tokenizer, opt: torch.optim.Optimizer,
          step: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                "tokens": tok.tokens, "n_numeric": tok.n_numeric,
                "config": model.cfg.to_json()}, tmp)
    tmp.replace(path)  # atomic: a kill never leaves half a checkpoint


def finetune(model: LoomShapesModel, tok: Tokenizer, rows: Sequence[Row], *,
             hyper: Hyper | None = None, run_dir: str | Path,
             on_progress: Callable[[Progress], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             on_checkpoint: Callable[[Path, int], None] | None = None,
             ) -> tuple[LoomShapesModel, Tokenizer, bool]:
    """Fine-tune ``model`` (the base, changed in place) on ``rows``; resumes from
    ``run_dir/ckpt.pt`` when one exists. Returns (model, tokenizer, finished): ``finished`` is
    False when ``should_stop`` ended it between steps (the last checkpoint is kept).
    ``on_checkpoint(path, step)`` runs after each checkpoint is written (to copy it away)."""
    h = hyper or Hyper()
    if not rows:
        raise ValueError("no labelled rows to fine-tune on")
    if h.threads:
        torch.set_num_threads(h.threads)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    ck = run / "ckpt.pt"
    state = torch.load(ck, map_location="cpu", weights_only=True) if ck.exists() else None
    if state is not None:
        # The vocabulary the run grew to, then its weights (shapes match once grown).
        tok, _ = grow_vocabulary(model, tok, state["tokens"][len(tok.tokens):])
        model.load_state_dict(state["model"])
    else:
        tok, _ = grow_vocabulary(model, tok, words_of(rows, tok))
    # uint8, (N, H, W, 3): a quarter of float32's memory; each batch converts its own rows.
    pixels = torch.from_numpy(np.stack([np.asarray(resize_to_model(r.image), dtype=np.uint8)
                                        for r in rows]))
    opt = torch.optim.AdamW(model.parameters(), lr=h.lr, weight_decay=0.01, betas=(0.9, 0.98))
    start = 0
    if state is not None:
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
    bank = MaskBank(model.renderer.window, model.renderer.MARGIN)
    model.train()
    t0 = time.monotonic()
    finished = True
    for step in range(start, h.steps):
        if should_stop is not None and should_stop():
            if step > start and step % h.ckpt_every:
                _save(ck, model, tok, opt, step)  # keep every finished step
                if on_checkpoint is not None:
                    on_checkpoint(ck, step)
            finished = False
            break
        rng = random.Random(h.seed * 1_000_003 + step)  # per-step stream: resume is reproducible
        for g in opt.param_groups:
            g["lr"] = lr_at(step, h.steps, h.lr, warmup=h.warmup)
        losses = _user_losses(model, _user_batch(tok, model, rows, pixels, rng, h.batch),
                              tok.pad_id)
        if h.replay:
            replay = model.losses(make_batch(tok, model.cfg, bank, rng, h.replay), tok.pad_id)
            losses.update({f"base_{k}": v for k, v in replay.items()})
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        if done % h.ckpt_every == 0 or done == h.steps:
            _save(ck, model, tok, opt, done)
            if on_checkpoint is not None:
                on_checkpoint(ck, done)
        if on_progress is not None:
            on_progress(Progress(done, h.steps, float(loss.detach()),  # type: ignore[union-attr]
                                 {k: float(v.detach()) for k, v in losses.items()},
                                 time.monotonic() - t0))
    model.eval()
    return model, tok, finished


def score(model: LoomShapesModel, tok: Tokenizer, rows: Sequence[Row],
          batch: int = 64) -> dict[str, float | int]:
    """Exact match on held-out rows: caption (rows with a caption), vqa (rows with a question)."""
    from pipeline.model import ModelInfo, ShapesModel

    serving = ShapesModel(model.eval(), tok, ModelInfo("finetune", "", "", ("caption", "vqa"),
                                                       0, "cpu"))
    norm = " ".join
    caps = [r for r in rows if r.caption]
    qas = [r for r in rows if r.question and r.answer]
    out: dict[str, float | int] = {"caption_rows": len(caps), "vqa_rows": len(qas)}
    with torch.inference_mode():
        if caps:
            ok = 0
            for k in range(0, len(caps), batch):
                part = caps[k:k + batch]
                got = serving.caption([resize_to_model(r.image.convert("RGB")) for r in part])
                ok += sum(norm(tok.split(g)) == norm(tok.split(r.caption or ""))
                          for g, r in zip(got, part))
            out["caption"] = ok / len(caps)
        if qas:
            ok = 0
            for k in range(0, len(qas), batch):
                part = qas[k:k + batch]
                got = serving.answer([resize_to_model(r.image.convert("RGB")) for r in part],
                                     [r.question or "" for r in part])
                ok += sum(norm(tok.split(g)) == norm(tok.split(r.answer or ""))
                          for g, r in zip(got, part))
            out["vqa"] = ok / len(qas)
    return out


def labelled_rows(n: int, seed: int, world: data.World = data.EXTENDED) -> list[Row]:
    """``n`` labelled scenes of ``world`` as a user might bring them (own renderer, perturbed):
    each with its caption and one question + answer. For tests and the quality check; a user's
    rows come from their own table."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        scene = data.sample_scene(rng, world=world)
        q, a = data.sample_question(scene, rng, world)
        rows.append(Row(data.render_perturbed(scene, rng), data.caption(scene), q, a))
    return rows
