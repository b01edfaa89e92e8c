"""An independent "other renderer", used for evaluation only.

It shares nothing with data.render but the scene description: shapes are analytic inside-tests
(disc equation, half-planes for the triangle) evaluated on a jittered k x k sub-pixel grid
directly at the output resolution, composited in float. So the "other renderer" target measures
how the model handles a different rasteriser, not a copy of its training renderer.
"""
from __future__ import annotations

import random

import numpy as np
from PIL import Image

from pipeline.data import CANVAS, Perturb, Scene, degrade


def _inside(shape: str, x: np.ndarray, y: np.ndarray, x0: float, y0: float, side: float) -> np.ndarray:
    if shape == "square":
        return (x >= x0) & (x < x0 + side) & (y >= y0) & (y < y0 + side)
    if shape == "circle":
        r = side / 2
        return (x - x0 - r) ** 2 + (y - y0 - r) ** 2 <= r * r
    if shape == "diamond":  # the L1 ball: vertices at the midpoints of the box's sides
        r = side / 2
        return np.abs(x - x0 - r) + np.abs(y - y0 - r) <= r
    # triangle as the intersection of three half-planes (edge functions), not a scanline fill
    ax, ay, bx, by, cx, cy = x0 + side / 2, y0, x0, y0 + side, x0 + side, y0 + side

    def edge(px, py, qx, qy):
        return (qx - px) * (y - py) - (qy - py) * (x - px)

    e1, e2, e3 = edge(ax, ay, bx, by), edge(bx, by, cx, cy), edge(cx, cy, ax, ay)
    return ((e1 <= 0) & (e2 <= 0) & (e3 <= 0)) | ((e1 >= 0) & (e2 >= 0) & (e3 >= 0))


def render_alt(scene: Scene, size: int = CANVAS, samples: int = 3, seed: int = 0) -> Image.Image:
    """Coverage by k x k jittered sub-samples per pixel at the output resolution."""
    rs = np.random.default_rng(seed)
    scale = size / CANVAS
    img = np.empty((size, size, 3), np.float32)
    img[:] = scene.background
    grid = (np.arange(samples) + 0.5) / samples
    jit = rs.uniform(-0.5 / samples, 0.5 / samples, (2, samples))  # one jittered pattern per image
    sx, sy = grid + jit[0], grid + jit[1]
    pix = np.arange(size, dtype=np.float32)
    # sample coordinates in reference (64-px) units: shape (size*k,)
    xs = ((pix[:, None] + sx[None, :]) / scale).reshape(-1)
    ys = ((pix[:, None] + sy[None, :]) / scale).reshape(-1)
    X, Y = np.meshgrid(xs, ys)
    for o in scene.objects:
        m = _inside(o.shape, X, Y, o.x0, o.y0, o.side).astype(np.float32)
        cov = m.reshape(size, samples, size, samples).mean(axis=(1, 3))[..., None]
        img = img * (1 - cov) + np.asarray(o.rgb, np.float32) * cov
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def render_alt_perturbed(scene: Scene, rng: random.Random) -> Image.Image:
    size = rng.choice((64, 128, 256))
    samples = rng.choice((1, 2, 3, 5)) if size < 256 else rng.choice((1, 2))
    p = Perturb(size=size, supersample=1,
                jpeg_quality=rng.randint(70, 100) if rng.random() < 0.5 else None,
                noise_sigma=rng.uniform(0, 6) if rng.random() < 0.5 else 0.0)
    return degrade(render_alt(scene, size, samples, rng.getrandbits(32)), p, rng)
