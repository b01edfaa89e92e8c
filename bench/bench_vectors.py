"""Duplicate grouping speed: brute force (numpy matrix products in blocks) against the faiss IVF
index, side by side at growing sizes, on unit vectors shaped like the embed task's (128-d, with
planted near-duplicates). Prints seconds per method and the ratio, and whether the index found
the same groups. BRUTE_FORCE_MAX in loom/vectors.py is where brute force passes about a second.

    python bench/bench_vectors.py [--sizes 5000,10000,20000,40000,80000] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def vectors_with_duplicates(n: int, d: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, d)).astype(np.float32)
    dup = rng.choice(n, size=n // 10, replace=False)       # 10% are near copies of another row
    src = rng.choice(n, size=n // 10)
    base[dup] = base[src] + rng.normal(scale=0.1, size=(len(dup), d)).astype(np.float32)
    return base / np.linalg.norm(base, axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="5000,10000,20000,40000,80000")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-brute-above", type=int, default=80_000)
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import faiss

    from loom import vectors

    faiss.omp_set_num_threads(a.threads)
    print(f"{'n':>7} {'brute s':>8} {'faiss s':>8} {'brute/faiss':>11} {'same groups':>11}")
    for n in (int(s) for s in a.sizes.split(",")):
        t = vectors.make_table(vectors_with_duplicates(n))
        t0 = time.perf_counter()
        fg = vectors.group(t, 0.9, "faiss")
        tf = time.perf_counter() - t0
        if n <= a.skip_brute_above:
            t0 = time.perf_counter()
            bg = vectors.group(t, 0.9, "brute")
            tb = time.perf_counter() - t0
            same = [g.rows for g in bg] == [g.rows for g in fg]
            print(f"{n:>7} {tb:>8.2f} {tf:>8.2f} {tb / tf:>11.2f} {str(same):>11}")
        else:
            print(f"{n:>7} {'-':>8} {tf:>8.2f} {'-':>11} {'-':>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
