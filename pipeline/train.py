"""Training loop for all three tasks (mixed batches), resumable, with export to safetensors.

    python -m pipeline.train --steps 4000 --run-dir runs/shapes --out pipeline/weights/loom-shapes-v1.safetensors

How v1 was trained (2-core CPU shared with other jobs, one torch thread, batch 32 images + 64
layouts): 1000 + 1400 steps (--init-from warm starts as the encoder gained GroupNorm, fixed 2D
sinusoids and the dense aux probe), 400 more, then 2200 steps with the aux "role" target
(`--init-from runs/shapes3/ckpt.pt --steps 2200 --warmup 100 --lr 1.2e-3`); 5000 steps in all.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch

from pipeline import checkpoint, data
from pipeline.config import ModelConfig
from pipeline.model import LoomShapesModel, text_batch
from pipeline.preprocess import batch_array
from pipeline.tokenizer import Tokenizer, numeric_token

NAME, VERSION = "loom-shapes", "v1"
DEFAULT_OUT = Path(__file__).parent / "weights" / "loom-shapes-v1.safetensors"


def _seq_tensors(tok: Tokenizer, seqs: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Target word lists -> decoder input ([bos] + seq) and output (seq + [eos]), pad-filled."""
    T = max(len(s) for s in seqs) + 1
    inp = torch.full((len(seqs), T), tok.pad_id, dtype=torch.long)
    out = torch.full((len(seqs), T), tok.pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids = [tok.index[w] for w in s]
        inp[i, : len(ids) + 1] = torch.tensor([tok.bos_id] + ids)
        out[i, : len(ids) + 1] = torch.tensor(ids + [tok.eos_id])
    return inp, out


def layout_words(scene: data.Scene) -> list[str]:
    return [numeric_token(v) if isinstance(v, int) else v for v in data.layout_values(scene)]


class MaskBank:
    """Every (shape, side) coverage target, rendered once by data.py (positions are integer,
    so the mask depends only on shape and side)."""

    def __init__(self, window: int, margin: int):
        self.keys = [(si, s) for si in range(len(data.SHAPES)) for s in range(10, 31)]
        self.targets = torch.zeros(len(self.keys), window, window)
        for k, (si, s) in enumerate(self.keys):
            m = data.coverage_mask(data.SHAPES[si], s, margin)
            self.targets[k, : m.shape[0], : m.shape[1]] = torch.from_numpy(m)

    def batch(self, rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = [rng.randrange(len(self.keys)) for _ in range(n)]
        shape = torch.tensor([self.keys[i][0] for i in idx])
        side = torch.tensor([float(self.keys[i][1]) for i in idx])
        return shape, side, self.targets[idx]


def make_batch(tok: Tokenizer, cfg: ModelConfig, bank: MaskBank, rng: random.Random,
               batch: int, gen_batch: int | None = None) -> dict[str, torch.Tensor]:
    exs = [data.make_example(rng) for _ in range(batch)]
    # layouts are cheap (no image), so the generate branch takes a larger batch
    gen_batch = gen_batch or 2 * batch
    cpu = torch.device("cpu")
    b: dict[str, torch.Tensor] = {"pixels": torch.from_numpy(batch_array([e.image for e in exs]))}
    b["cap_text"] = text_batch(tok, [""] * batch, "caption", cfg.max_text_len, cpu)
    b["cap_in"], b["cap_out"] = _seq_tensors(tok, [e.caption.split() for e in exs])
    b["vqa_text"] = text_batch(tok, [e.question for e in exs], "vqa", cfg.max_text_len, cpu)
    b["vqa_in"], b["vqa_out"] = _seq_tensors(tok, [[e.answer] for e in exs])
    g = cfg.grid
    b["aux_obj"] = torch.zeros(batch, g * g)
    for key in ("aux_shape", "aux_colour", "aux_size", "aux_role"):
        b[key] = torch.full((batch, g * g), -100, dtype=torch.long)
    for i, e in enumerate(exs):
        for k, o in enumerate(e.scene.objects):
            role = 0 if e.scene.relation is None else 1 + k + 2 * (e.scene.relation == "above")
            cx, cy = o.centre
            cell = int(cy * g / data.CANVAS) * g + int(cx * g / data.CANVAS)
            b["aux_obj"][i, cell] = 1.0
            b["aux_shape"][i, cell] = data.SHAPES.index(o.shape)
            b["aux_colour"][i, cell] = data.COLOURS.index(o.colour)
            b["aux_size"][i, cell] = int(o.size == "large")
            b["aux_role"][i, cell] = role
    scenes = [data.sample_scene(rng) for _ in range(gen_batch)]
    b["gen_text"] = text_batch(tok, [data.caption(s) for s in scenes], "generate", cfg.max_text_len, cpu)
    b["gen_in"], b["gen_out"] = _seq_tensors(tok, [layout_words(s) for s in scenes])
    b["r_shape"], b["r_side"], b["r_target"] = bank.batch(rng, 16)
    return b


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def quick_eval(model: LoomShapesModel, tok: Tokenizer, n: int, seed: int) -> dict[str, float]:
    from pipeline.evaluate import evaluate_serving
    from pipeline.model import ModelInfo, ShapesModel

    info = ModelInfo(NAME, VERSION, "", ("caption", "vqa", "generate"), 0, "cpu")
    serving = ShapesModel(model, tok, info)
    try:
        return evaluate_serving(serving, n=n, seed=seed, renderer="own-perturbed", diversity_prompts=4)
    finally:
        model.train()


def train(steps: int = 4000, out: str | Path = DEFAULT_OUT, run_dir: str | Path = "runs/shapes",
          resume: bool = True, batch: int = 32, lr: float = 1.5e-3, seed: int = 0,
          eval_every: int = 500, ckpt_every: int = 200, threads: int = 1,
          cfg: ModelConfig | None = None, log=print, init_from: str | Path | None = None,
          warmup: int = 300) -> Path:
    torch.set_num_threads(threads)
    tok = Tokenizer.build()
    cfg = cfg or ModelConfig(vocab_size=len(tok))
    torch.manual_seed(seed)
    model = LoomShapesModel(cfg, tok.numeric_start)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    ck = run / "ckpt.pt"
    start = 0
    if init_from and not (resume and ck.exists()):
        # warm start: take every tensor whose name and shape still match (new layers stay fresh)
        prev = torch.load(init_from, map_location="cpu", weights_only=True)["model"]
        own = model.state_dict()
        keep = {k: v for k, v in prev.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(keep, strict=False)
        log(f"warm start from {init_from}: {len(keep)}/{len(own)} tensors")
    if resume and ck.exists():
        state = torch.load(ck, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
        log(f"resumed from {ck} at step {start}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"params {n_params:,}; steps {start}..{steps}; batch {batch}")
    bank = MaskBank(model.renderer.window, model.renderer.MARGIN)
    model.train()
    t0, t_last = time.time(), time.time()
    for step in range(start, steps):
        rng = random.Random(seed * 1_000_003 + step)      # per-step stream: resume is reproducible
        b = make_batch(tok, cfg, bank, rng, batch)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=warmup)
        losses = model.losses(b, tok.pad_id)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            parts = " ".join(f"{k} {v.item():.4f}" for k, v in losses.items())
            dt = (time.time() - t_last) / (50 if step > start else 1)
            t_last = time.time()
            log(f"step {step} loss {loss.item():.4f} ({parts}) {dt:.2f}s/step lr {opt.param_groups[0]['lr']:.2e}")
        if (step + 1) % ckpt_every == 0 or step == steps - 1:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                        "config": cfg.to_json()}, run / "ckpt.tmp")
            (run / "ckpt.tmp").replace(ck)               # atomic: a crash never leaves half a file
        if eval_every and ((step + 1) % eval_every == 0 or step == steps - 1):
            m = quick_eval(model, tok, n=200, seed=10_000 + step)
            log(f"eval step {step + 1}: " + " ".join(f"{k} {v:.4f}" for k, v in m.items()))
    log(f"trained to step {steps} in {time.time() - t0:.0f}s this run")
    out = Path(out)
    sha = checkpoint.save(out, model, tok, NAME, VERSION)
    log(f"exported {out} ({out.stat().st_size:,} bytes) sha256 {sha}")
    return out


def export_run(run_dir: str | Path, out: str | Path = DEFAULT_OUT) -> str:
    """Export a run's latest resumable checkpoint to the shipped safetensors format."""
    state = torch.load(Path(run_dir) / "ckpt.pt", map_location="cpu", weights_only=True)
    tok = Tokenizer.build()
    model = LoomShapesModel(ModelConfig.from_json(state["config"]), tok.numeric_start)
    model.load_state_dict(state["model"])
    return checkpoint.save(out, model, tok, NAME, VERSION)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loom train", description="train the loom-shapes model")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--run-dir", default="runs/shapes")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=500)
    # one thread: on a shared 2-core box, two OpenMP threads spin against other load (measured
    # 12 s/step vs 2.8 s/step); pass --threads 2 on an idle machine
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--init-from", help="warm-start weights from another run's ckpt.pt")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--export-only", action="store_true", help="export the run's checkpoint and stop")
    a = ap.parse_args(argv)
    if a.export_only:
        print(f"exported {a.out} sha256 {export_run(a.run_dir, a.out)}")
        return 0

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    train(steps=a.steps, out=a.out, run_dir=a.run_dir, resume=not a.no_resume, batch=a.batch,
          lr=a.lr, seed=a.seed, eval_every=a.eval_every, threads=a.threads, log=log,
          init_from=a.init_from, warmup=a.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
