"""In-process throughput of the shipped model: items/s for caption, answer and generate at
batch 1, 8, 32 and 64 on this machine, side by side with the 1M-parameter prototype's figures
(no KV cache; 70 img/s captioning at batch 1 and 200 img/s at batch 64 on the same 2-core CPU).

    python bench/model_throughput.py [--device cpu] [--threads 2] [--seconds 3]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROTOTYPE_CAPTION = {1: 70.0, 64: 200.0}
BATCHES = (1, 8, 32, 64)


def rate(fn, items: int, seconds: float) -> float:
    fn()                                              # warm-up (allocator, kernels)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n == 0:
        fn()
        n += items
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args(argv)

    import torch

    from pipeline import data, registry

    torch.set_num_threads(a.threads)
    model = registry.load("loom-shapes", device=a.device)
    rng = random.Random(0)
    scenes = [data.sample_scene(rng) for _ in range(max(BATCHES))]
    images = [data.render(s) for s in scenes]
    questions = [data.sample_question(s, rng)[0] for s in scenes]
    prompts = [data.caption(s) for s in scenes]

    print(f"{model.info.name} {model.info.version}  params {model.info.parameters:,}  device {model.info.device}"
          f"  torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5} | {'caption/s':>10} | {'answer/s':>9} | {'generate/s':>10} | caption vs prototype")
    print("-" * 68)
    for b in BATCHES:
        cap = rate(lambda: model.caption(images[:b]), b, a.seconds)
        ans = rate(lambda: model.answer(images[:b], questions[:b]), b, a.seconds)
        gen = rate(lambda: model.generate(prompts[:b], list(range(b))), b, a.seconds)
        proto = PROTOTYPE_CAPTION.get(b)
        vs = f"{cap / proto:.2f}x ({proto:.0f}/s)" if proto else "-"
        print(f"{b:>5} | {cap:>10.1f} | {ans:>9.1f} | {gen:>10.1f} | {vs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
