"""Train and measure the ``embed`` projection head (pipeline.model.EmbedHead) on the frozen
loom-shapes backbone. CPU, one thread; the backbone's features are computed once and cached.

    python -m pipeline.train_embed                       # train, write the head, print its sha256
    python -m pipeline.train_embed --eval --scenes 1000  # the quality figures on fresh scenes

Training data, per base scene: the plain render, two near-duplicates (JPEG, resize 2x / 0.5x,
noise, or another renderer setting) and four distinct scenes (one object moved by more than 8 px,
the whole scene moved, one attribute or the relation changed). Losses: image -> caption over all
captions and caption -> image in the batch (the semantic half, InfoNCE), and hinges on the full
vector's cosine around the dedupe threshold (near-duplicates above, distinct scenes below).
"""
from __future__ import annotations

import argparse
import io
import itertools
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import data
from pipeline.data import CANVAS, COLOURS, PALETTE, SHAPES, SIZE_RANGES, Obj, Scene

THRESHOLD = 0.9          # the default dedupe threshold (loom/vectors.py DEFAULT_THRESHOLD)
MIN_SHIFT, MAX_SHIFT = 9.0, 16.0  # "moved by more than 8 px"


# ---------------------------------------------------------------- scene variants

def valid(scene: Scene) -> bool:
    """Inside the canvas and, for two objects, the caption's relation still holds (the same
    rules as data._place_pair), so the caption of a moved scene is still true."""
    for o in scene.objects:
        if o.x0 < 0 or o.y0 < 0 or o.x0 + o.side > CANVAS or o.y0 + o.side > CANVAS:
            return False
    if len(scene.objects) == 2:
        a, b = scene.objects
        ax = 0 if scene.relation == "left" else 1
        ua, ub = (a.x0, b.x0) if ax == 0 else (a.y0, b.y0)
        if ub < ua + a.side + data.GAP:
            return False
        du = b.centre[ax] - a.centre[ax]
        dv = b.centre[1 - ax] - a.centre[1 - ax]
        if abs(dv) > du / 2:
            return False
    return True


def _vector(rng: random.Random, lo: float, hi: float) -> tuple[int, int]:
    while True:
        dx, dy = rng.randint(-int(hi), int(hi)), rng.randint(-int(hi), int(hi))
        if lo <= math.hypot(dx, dy) <= hi:
            return dx, dy


def _moved(o: Obj, dx: int, dy: int) -> Obj:
    return replace(o, x0=o.x0 + dx, y0=o.y0 + dy)


def shift_object(scene: Scene, rng: random.Random, lo: float = MIN_SHIFT,
                 hi: float = MAX_SHIFT) -> Scene | None:
    """One object moved by a distance in [lo, hi] px, caption unchanged (None if no room)."""
    for _ in range(200):
        k = rng.randrange(len(scene.objects))
        dx, dy = _vector(rng, lo, hi)
        objs = list(scene.objects)
        objs[k] = _moved(objs[k], dx, dy)
        s = replace(scene, objects=tuple(objs))
        if valid(s):
            return s
    return None


def translate(scene: Scene, rng: random.Random, lo: float = MIN_SHIFT,
              hi: float = MAX_SHIFT) -> Scene | None:
    for _ in range(200):
        dx, dy = _vector(rng, lo, hi)
        s = replace(scene, objects=tuple(_moved(o, dx, dy) for o in scene.objects))
        if valid(s):
            return s
    return None


def change_attribute(scene: Scene, rng: random.Random, kind: str) -> Scene | None:
    """One object's shape, colour name or size class changed (kind), the rest kept."""
    for _ in range(200):
        k = rng.randrange(len(scene.objects))
        o = scene.objects[k]
        if kind == "shape":
            new = replace(o, shape=rng.choice([s for s in SHAPES if s != o.shape]))
        elif kind == "colour":
            c = rng.choice([c for c in COLOURS if c != o.colour])
            rgb = tuple(min(255, max(0, v + rng.randint(-data.JITTER, data.JITTER)))
                        for v in PALETTE[c])
            new = replace(o, colour=c, rgb=rgb)  # type: ignore[arg-type]
        else:
            other = "large" if o.size == "small" else "small"
            side = rng.randint(*SIZE_RANGES[other])
            cx, cy = o.centre  # grow or shrink about the centre, then keep it on the canvas
            x0 = min(max(0, round(cx - side / 2)), CANVAS - side)
            y0 = min(max(0, round(cy - side / 2)), CANVAS - side)
            new = replace(o, x0=x0, y0=y0, side=side)
        objs = list(scene.objects)
        objs[k] = new
        s = replace(scene, objects=tuple(objs))
        if valid(s):
            return s
    return None


def change_relation(scene: Scene, rng: random.Random) -> Scene | None:
    """The same two objects placed with the other relation (left of <-> above)."""
    if len(scene.objects) != 2:
        return None
    rel = "above" if scene.relation == "left" else "left"
    a, b = scene.objects
    xa, ya, xb, yb = data._place_pair(rng, a.side, b.side, rel)
    return Scene(scene.background, (replace(a, x0=xa, y0=ya), replace(b, x0=xb, y0=yb)), rel)


DISTINCT: dict[str, Callable[[Scene, random.Random], Scene | None]] = {
    "shape": lambda s, r: change_attribute(s, r, "shape"),
    "colour": lambda s, r: change_attribute(s, r, "colour"),
    "size": lambda s, r: change_attribute(s, r, "size"),
    "relation": change_relation,
    "moved_object": shift_object,
    "moved_scene": translate,
}


# ---------------------------------------------------------------- near-duplicates

def jpeg(img: Image.Image, quality: int = 70) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def noise(img: Image.Image, sigma: float, rng: random.Random) -> Image.Image:
    nrng = np.random.default_rng(rng.getrandbits(32))
    arr = np.asarray(img, dtype=np.float32) + nrng.normal(0, sigma, (img.size[1], img.size[0], 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def resize(img: Image.Image, factor: float) -> Image.Image:
    return img.resize((round(img.size[0] * factor), round(img.size[1] * factor)), Image.BICUBIC)


# The figures' near-duplicates: the worst case of each the issue names.
NEAR_DUPLICATES: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "jpeg_q70": lambda im, r: jpeg(im, 70),
    "resize_2x": lambda im, r: resize(im, 2.0),
    "resize_0.5x": lambda im, r: resize(im, 0.5),
    "noise_sigma6": lambda im, r: noise(im, 6.0, r),
}


def random_near_duplicate(scene: Scene, img: Image.Image, rng: random.Random) -> Image.Image:
    """A training near-duplicate: one or two of the transforms with random strength, or the
    scene drawn by another renderer setting (size, anti-aliasing, JPEG, noise)."""
    choice = rng.randrange(6)
    if choice == 0:
        return data.render_perturbed(scene, rng)
    out = img
    ops = rng.sample(range(4), rng.choice((1, 1, 2)))
    for op in ops:
        if op == 0:
            out = jpeg(out, rng.randint(60, 95))
        elif op == 1:
            out = resize(out, rng.choice((2.0, 1.5, 3.0, 4.0)))
        elif op == 2:
            out = resize(out, rng.choice((0.5, 0.5, 0.75, 0.4)))
        else:
            out = noise(out, rng.uniform(1.0, 8.0), rng)
    return out


# ---------------------------------------------------------------- captions

def all_captions() -> list[str]:
    """Every caption the shapes world can produce (2,628): the text side's classes."""
    phrases = [f"a {z} {c} {s}" for z in ("small", "large") for c in COLOURS for s in SHAPES]
    pairs = [f"{a} {link} {b}" for a, b in itertools.product(phrases, phrases)
             for link in ("to the left of", "above")]
    return phrases + pairs


# ---------------------------------------------------------------- features

VARIANTS = 7  # plain, 2 near-duplicates, 4 distinct


def training_group(rng: random.Random) -> tuple[list[Image.Image], list[str]]:
    """One base scene's VARIANTS images and captions (order: plain, near, near, distinct x4)."""
    while True:
        scene = data.sample_scene(rng)
        kinds = ["moved_object", "moved_scene",
                 rng.choice(("shape", "colour", "size")),
                 rng.choice(("shape", "colour", "size", "relation", "relation"))]
        others = [DISTINCT[k](scene, rng) for k in kinds]
        others = [o if o is not None else change_attribute(scene, rng, "colour") for o in others]
        if all(o is not None for o in others):
            break
    img = data.render(scene)
    images = [img, random_near_duplicate(scene, img, rng), random_near_duplicate(scene, img, rng)]
    caps = [data.caption(scene)] * 3
    for o in others:
        assert o is not None
        oi = data.render(o)
        # some distinct scenes are themselves degraded: distinct must survive JPEG/noise too
        images.append(random_near_duplicate(o, oi, rng) if rng.random() < 0.3 else oi)
        caps.append(data.caption(o))
    return images, caps


def extract(model: object, n_scenes: int, seed: int, batch: int = 32,
            log: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray]:
    """Fused image tokens (n_scenes, VARIANTS, N, d) float16 and caption ids (n, VARIANTS)."""
    rng = random.Random(seed)
    index = {c: i for i, c in enumerate(all_captions())}
    feats, labels = [], []
    t0 = time.perf_counter()
    for start in range(0, n_scenes, batch):
        groups = [training_group(rng) for _ in range(min(batch, n_scenes - start))]
        images = [im for g in groups for im in g[0]]
        with torch.inference_mode():
            tok = model.fused_tokens(images)  # type: ignore[attr-defined]
        feats.append(tok.float().reshape(len(groups), VARIANTS, *tok.shape[1:]).half().numpy())
        labels.append(np.array([[index[c] for c in g[1]] for g in groups], dtype=np.int64))
        if (start // batch) % 20 == 0:
            log(f"  features {start + len(groups)}/{n_scenes} ({time.perf_counter() - t0:.0f}s)")
    return np.concatenate(feats), np.concatenate(labels)


def text_features(model: object) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        tok, valid = model.text_tokens(all_captions())  # type: ignore[attr-defined]
    return tok.float().clone(), valid.clone()


# ---------------------------------------------------------------- training

def pair_losses(v: torch.Tensor, margin: float = 0.05) -> torch.Tensor:
    """v (B, VARIANTS, D) unit vectors: near-duplicates (1, 2) above THRESHOLD + margin to the
    plain render and each other, distinct scenes (3..) below THRESHOLD - margin to all three."""
    sim = torch.einsum("bvd,bwd->bvw", v, v)
    pos = torch.stack([sim[:, 0, 1], sim[:, 0, 2], sim[:, 1, 2]], 1)
    neg = sim[:, :3, 3:].flatten(1)
    return (F.relu(THRESHOLD + margin - pos) ** 2).mean() * 10 + \
        (F.relu(neg - (THRESHOLD - margin)) ** 2).mean() * 10


def train(feats: np.ndarray, labels: np.ndarray, txt: torch.Tensor, txt_valid: torch.Tensor,
          steps: int, batch: int = 64, lr: float = 2e-3, seed: int = 0, tau: float = 0.05,
          log: Callable[[str], None] = print) -> torch.nn.Module:
    from pipeline.model import EmbedHead

    torch.manual_seed(seed)
    d = feats.shape[-1]
    head = EmbedHead(d=d, n_tokens=feats.shape[2])
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = gen.choice(len(feats), size=batch, replace=False)
        x = torch.from_numpy(feats[idx].astype(np.float32))            # (B, V, N, d)
        y = torch.from_numpy(labels[idx])                               # (B, V)
        B, V = y.shape
        sem, geo = head.image_parts(x.flatten(0, 1))
        v = head.combine(sem, geo).view(B, V, -1)
        # every caption's text vector, every step (2,628 short texts: cheap, no false negatives)
        tsem = head.text_sem(txt, txt_valid)                            # (C, half)
        logits_it = sem @ tsem.T / tau                                  # image -> all captions
        l_it = F.cross_entropy(logits_it, y.flatten())
        # caption -> images of the batch; every image with that caption is a positive
        caps = y[:, 0]
        logits_ti = tsem[caps] @ sem.T / tau                            # (B, B*V)
        pos = caps[:, None] == y.flatten()[None, :]
        l_ti = -(torch.logsumexp(logits_ti.masked_fill(~pos, -1e4), 1)
                 - torch.logsumexp(logits_ti, 1)).mean()
        l_pair = pair_losses(v)
        loss = l_it + l_ti + l_pair
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  step {step} loss {loss.item():.3f} (i->t {l_it.item():.3f} "
                f"t->i {l_ti.item():.3f} pairs {l_pair.item():.4f}) "
                f"{time.perf_counter() - t0:.0f}s")
    return head.eval()


def save_head(head: torch.nn.Module, path: Path) -> str:
    from safetensors.torch import save_file

    from pipeline.checkpoint import sha256_file

    meta = {"d": str(head.geo_tok.in_features), "half": str(head.half),
            "n_tokens": str(head.img_geo[0].in_features // head.geo_tok.out_features),
            "queries": str(head.img_score.out_features),
            "token_dim": str(head.geo_tok.out_features), "sem_weight": str(head.sem_weight)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(path),
              metadata=meta)
    return sha256_file(path)


# ---------------------------------------------------------------- the quality figures

def measure(model: object, n_scenes: int, seed: int, threshold: float = THRESHOLD,
            log: Callable[[str], None] = print) -> dict[str, object]:
    """Near-duplicate and distinct-pair rates at ``threshold`` and text -> image top-1, on
    ``n_scenes`` fresh scenes (seeded, none seen in training)."""
    rng = random.Random(seed)
    scenes = [data.sample_scene(rng) for _ in range(n_scenes)]
    originals = [data.render(s) for s in scenes]

    def embed(images: list[Image.Image]) -> np.ndarray:
        out = []
        for i in range(0, len(images), 64):
            out.extend(model.embed(images[i:i + 64]))  # type: ignore[attr-defined]
        return np.stack(out)

    base = embed(originals)
    near: dict[str, np.ndarray] = {}
    for name, fn in NEAR_DUPLICATES.items():
        near[name] = np.einsum("nd,nd->n", base, embed([fn(im, rng) for im in originals]))
    distinct: dict[str, np.ndarray] = {}
    for name, fn in DISTINCT.items():
        pairs = [(i, fn(s, rng)) for i, s in enumerate(scenes)]
        pairs = [(i, o) for i, o in pairs if o is not None]
        vec = embed([data.render(o) for _, o in pairs])
        distinct[name] = np.einsum("nd,nd->n", base[[i for i, _ in pairs]], vec)
    caps = [data.caption(s) for s in scenes]
    queries = sorted(set(caps))
    q = np.stack(model.embed_text(queries))  # type: ignore[attr-defined]
    top = (q @ base.T).argmax(1)
    hits = sum(caps[t] == c for t, c in zip(top, queries))
    near_all = np.concatenate(list(near.values()))
    dist_all = np.concatenate(list(distinct.values()))
    report = {
        "threshold": threshold,
        "near_duplicate_rate": float((near_all >= threshold).mean()),
        "near_duplicate_pairs": int(near_all.size),
        "near_by_kind": {k: float((v >= threshold).mean()) for k, v in near.items()},
        "near_min_cos": float(near_all.min()),
        "distinct_rate": float((dist_all < threshold).mean()),
        "distinct_pairs": int(dist_all.size),
        "distinct_by_kind": {k: float((v < threshold).mean()) for k, v in distinct.items()},
        "distinct_max_cos": float(dist_all.max()),
        "retrieval_top1": hits / len(queries),
        "retrieval_queries": len(queries),
        "retrieval_images": n_scenes,
    }
    return report


def main(argv: list[str] | None = None) -> int:
    from pipeline import registry

    p = argparse.ArgumentParser(prog="python -m pipeline.train_embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", action="store_true", help="measure the shipped head instead")
    p.add_argument("--scenes", type=int, default=None, help="base scenes (train 3000, eval 1000)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--cache", type=Path, default=None, help="cache the features in this .npz")
    p.add_argument("--out", type=Path, default=None, help="head file (default: the registry's)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.eval:
        model = registry.load("loom-shapes", device="cpu")
        t0 = time.perf_counter()
        rep = measure(model, a.scenes or 1000, 10_000 if a.seed is None else a.seed)
        for k, v in rep.items():
            print(f"{k}: {v}")
        print(f"measured in {time.perf_counter() - t0:.0f}s")
        return 0
    entry = registry.get("loom-shapes")
    backbone = registry.load_entry(entry, device="cpu", with_head=False)  # the frozen part
    t0 = time.perf_counter()
    if a.cache and a.cache.is_file():
        z = np.load(a.cache)
        feats, labels = z["feats"], z["labels"]
    else:
        feats, labels = extract(backbone, a.scenes or 3000, 0 if a.seed is None else a.seed)
        if a.cache:
            np.savez(a.cache, feats=feats, labels=labels)
    txt, valid_ = text_features(backbone)
    t1 = time.perf_counter()
    print(f"features: {feats.shape} in {t1 - t0:.0f}s")
    head = train(feats, labels, txt, valid_, a.steps)
    t2 = time.perf_counter()
    out = a.out or entry.embed_head
    sha = save_head(head, out)
    print(f"trained in {t2 - t1:.0f}s (features {t1 - t0:.0f}s); wrote {out}\nsha256 {sha}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
