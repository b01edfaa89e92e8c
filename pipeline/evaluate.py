"""Metrics: caption / vqa exact match and the model-free generation judge.

    python -m pipeline.evaluate --n 1000            # shipped model, all renderer settings
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Callable, Protocol

from PIL import Image

from pipeline import analyse, data
from pipeline.render_alt import render_alt_perturbed

RENDERERS: dict[str, Callable[[data.Scene, random.Random], Image.Image]] = {
    "own": lambda s, r: data.render(s),
    "own-perturbed": data.render_perturbed,
    "other-perturbed": render_alt_perturbed,
}


class Serving(Protocol):
    def caption(self, images: list[Image.Image]) -> list[str]: ...
    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]: ...
    def generate(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]: ...


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield range(i, min(n, i + size))


def understanding(model: Serving, n: int, seed: int, renderer: str, batch: int = 64,
                  world: data.World = data.BASE) -> dict[str, float]:
    """Caption and vqa exact match on n fresh scenes (one question per scene, kind uniform)."""
    rng = random.Random(seed)
    draw = RENDERERS[renderer]
    cap_ok = vqa_ok = 0
    for idx in _chunks(n, batch):
        scenes = [data.sample_scene(rng, world=world) for _ in idx]
        images = [draw(s, rng) for s in scenes]
        qa = [data.sample_question(s, rng, world) for s in scenes]
        caps = model.caption(images)
        ans = model.answer(images, [q for q, _ in qa])
        cap_ok += sum(c == data.caption(s) for c, s in zip(caps, scenes))
        vqa_ok += sum(a == t for a, (_, t) in zip(ans, qa))
    return {"caption": cap_ok / n, "vqa": vqa_ok / n}


def generation(model: Serving, n: int, seed: int, batch: int = 64) -> float:
    """Fraction of generated images whose read-back caption equals the prompt."""
    rng = random.Random(seed)
    ok = 0
    for idx in _chunks(n, batch):
        prompts = [data.caption(data.sample_scene(rng)) for _ in idx]
        seeds = [rng.getrandbits(31) for _ in idx]
        imgs = model.generate(prompts, seeds)
        ok += sum(analyse.read_caption(im) == p for im, p in zip(imgs, prompts))
    return ok / n


def diversity(model: Serving, prompts: int, seed: int, per_prompt: int = 8) -> tuple[int, float]:
    """(min, mean) distinct layouts among `per_prompt` seeds, over `prompts` prompts."""
    rng = random.Random(seed)
    ps = [data.caption(data.sample_scene(rng)) for _ in range(prompts)]
    imgs = model.generate([p for p in ps for _ in range(per_prompt)], list(range(prompts * per_prompt)))
    counts = [analyse.distinct_layouts(imgs[i * per_prompt:(i + 1) * per_prompt]) for i in range(prompts)]
    return min(counts), sum(counts) / len(counts)


def analyser_on_truth(n: int, seed: int, renderer: str) -> float:
    """The judge's own accuracy: ground-truth renders must read back as their captions."""
    rng = random.Random(seed)
    draw = RENDERERS[renderer]
    ok = 0
    for _ in range(n):
        s = data.sample_scene(rng)
        ok += analyse.read_caption(draw(s, rng)) == data.caption(s)
    return ok / n


def evaluate_serving(model: Serving, n: int = 1000, seed: int = 1, renderer: str = "own-perturbed",
                     diversity_prompts: int = 16) -> dict[str, float]:
    out = understanding(model, n, seed, renderer)
    out["generate"] = generation(model, n, seed + 1)
    if diversity_prompts:
        lo, mean = diversity(model, diversity_prompts, seed + 2)
        out["diversity_min"], out["diversity_mean"] = float(lo), mean
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate")
    ap.add_argument("--model", default="loom-shapes")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=20261128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights", help="evaluate this safetensors file instead (no registry sha check)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    import torch

    from pipeline import registry

    torch.set_num_threads(a.threads)
    if a.weights:
        from pipeline import checkpoint
        from pipeline.model import ModelInfo, ShapesModel

        module, tok, meta = checkpoint.load(a.weights, a.device)
        info = ModelInfo(meta.get("name", "?"), meta.get("version", "?"), checkpoint.sha256_file(a.weights),
                         ("caption", "vqa", "generate"), sum(p.numel() for p in module.parameters()), a.device)
        model = ShapesModel(module, tok, info)
    else:
        model = registry.load(a.model, device=a.device)
    print(f"model {model.info.name} {model.info.version} sha256 {model.info.weights_sha256[:16]}... "
          f"params {model.info.parameters:,}; n={a.n} fresh scenes, seed {a.seed}")
    t = time.time()
    for r in RENDERERS:
        print(f"analyser on ground truth [{r}]: {analyser_on_truth(a.n, a.seed + 7, r):.4f}")
    for i, r in enumerate(RENDERERS):
        m = understanding(model, a.n, a.seed + 100 * i, r)
        print(f"[{r:>15}] caption {m['caption']:.4f}  vqa {m['vqa']:.4f}")
    print(f"generate analyser match: {generation(model, a.n, a.seed + 1):.4f}")
    lo, mean = diversity(model, 50, a.seed + 2)
    print(f"diversity over 50 prompts x 8 seeds: min {lo} mean {mean:.2f} distinct layouts")
    print(f"({time.time() - t:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
