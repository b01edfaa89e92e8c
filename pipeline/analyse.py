"""Model-free judge for generated images: read a 64x64 picture back into a caption.

No learned parts: border-mode background, threshold segmentation, connected components,
nearest palette colour, box side -> size, silhouette -> shape, centroids -> relation.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.data import PALETTE, SIZE_RANGES
from pipeline.preprocess import resize_to_model

FG_THRESHOLD = 80      # max-channel distance from background; objects sit >= ~160 away
MIN_PIXELS = 12        # smaller specks are noise / JPEG ringing, not shapes
_PAL_NAMES = list(PALETTE)
_PAL = np.array([PALETTE[c] for c in _PAL_NAMES], np.float32)
_SIZE_SPLIT = (SIZE_RANGES["small"][1] + SIZE_RANGES["large"][0]) / 2


@dataclass(frozen=True)
class Found:
    shape: str
    colour: str
    size: str
    side: int
    centre: tuple[float, float]


def background(arr: np.ndarray) -> np.ndarray:
    border = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]]).astype(np.int32)
    keys = [tuple(p) for p in (border // 8)]
    mode = Counter(keys).most_common(1)[0][0]
    sel = np.all(border // 8 == np.array(mode), axis=1)
    return border[sel].mean(axis=0)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components as (n, 2) arrays of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    comps = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        stack, pts = [(r0, c0)], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            pts.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        comps.append(np.array(pts))
    return comps


def _shape(pts: np.ndarray) -> tuple[str, int]:
    r0, c0 = pts.min(axis=0)
    r1, c1 = pts.max(axis=0)
    h, w = r1 - r0 + 1, c1 - c0 + 1
    fill = len(pts) / (h * w)
    widths = np.bincount(pts[:, 0] - r0, minlength=h)
    q = max(1, h // 4)
    top, bottom = widths[:q].mean(), widths[-q:].mean()
    # a triangle's rows widen from apex to base; circle and square are symmetric top/bottom
    if top < 0.6 * bottom:
        shape = "triangle"
    elif fill > 0.88:
        shape = "square"
    else:
        shape = "circle"
    return shape, int(max(h, w))


def find_objects(img: Image.Image) -> list[Found]:
    arr = np.asarray(resize_to_model(img), dtype=np.float32)
    bg = background(arr)
    dist = np.abs(arr - bg).max(axis=2)
    found = []
    for pts in _components(dist > FG_THRESHOLD):
        if len(pts) < MIN_PIXELS:
            continue
        d = dist[pts[:, 0], pts[:, 1]]
        core = pts[d >= 0.8 * d.max()]           # interior pixels: no edge blending
        rgb = arr[core[:, 0], core[:, 1]].mean(axis=0)
        colour = _PAL_NAMES[int(np.argmin(((_PAL - rgb) ** 2).sum(axis=1)))]
        shape, side = _shape(pts)
        size = "small" if side < _SIZE_SPLIT else "large"
        cy, cx = pts.mean(axis=0)
        found.append(Found(shape, colour, size, side, (float(cx) + 0.5, float(cy) + 0.5)))
    return found


def order(found: list[Found]) -> tuple[list[Found], str | None]:
    """Caption order and relation from centroids."""
    if len(found) != 2:
        return found, None
    a, b = found
    dx, dy = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
    if abs(dx) >= abs(dy):
        return (sorted(found, key=lambda f: f.centre[0]), "left")
    return (sorted(found, key=lambda f: f.centre[1]), "above")


def read_caption(img: Image.Image) -> str | None:
    """The caption the image shows, or None when it is not a valid 1-2 shape scene."""
    objs, rel = order(find_objects(img))
    if len(objs) not in (1, 2):
        return None
    ph = [f"a {o.size} {o.colour} {o.shape}" for o in objs]
    if len(ph) == 1:
        return ph[0]
    return f"{ph[0]} {'to the left of' if rel == 'left' else 'above'} {ph[1]}"


def centres(img: Image.Image) -> list[tuple[float, float]]:
    return [o.centre for o in order(find_objects(img))[0]]


def distinct_layouts(images: list[Image.Image], min_move: float = 3.0) -> int:
    """Count layouts that differ from every earlier kept one by some centre moving > min_move."""
    kept: list[list[tuple[float, float]]] = []
    for im in images:
        cs = centres(im)
        new = True
        for k in kept:
            if len(k) == len(cs) and all(np.hypot(a[0] - b[0], a[1] - b[1]) <= min_move for a, b in zip(k, cs)):
                new = False
                break
        if new:
            kept.append(cs)
    return len(kept)
