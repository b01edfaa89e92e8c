"""Shapes world (see shared/specs/shapes-world.md): seeded scenes, rendering, text targets.

Geometry is integer at the 64x64 reference: box = (x0, y0, side) covers [x0, x0+side).
Objects are stored in caption order (left then right, or upper then lower).
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from pipeline.preprocess import resize_to_model

CANVAS = 64
SHAPES = ("circle", "square", "triangle")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
    "yellow": (235, 205, 30), "purple": (150, 50, 180), "orange": (245, 140, 30),
}
COLOURS = tuple(PALETTE)
SIZE_RANGES = {"small": (10, 16), "large": (22, 30)}


@dataclass(frozen=True)
class World:
    """The colours and shapes scenes are drawn from (sizes, placement, grammar and questions are
    the same in every world)."""

    shapes: tuple[str, ...]
    palette: dict[str, tuple[int, int, int]]

    @property
    def colours(self) -> tuple[str, ...]:
        return tuple(self.palette)


BASE = World(SHAPES, PALETTE)
# The spec's extension world (fine-tuning): two colours and one shape the shipped model never saw.
EXTENDED = World(SHAPES + ("diamond",), {**PALETTE, "pink": (240, 110, 180),
                                         "cyan": (40, 190, 210)})
JITTER = 15
GAP = 2


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    rgb: tuple[int, int, int]
    x0: int
    y0: int
    side: int

    @property
    def size(self) -> str:
        return "small" if self.side <= SIZE_RANGES["small"][1] else "large"

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x0 + self.side / 2, self.y0 + self.side / 2)


@dataclass(frozen=True)
class Scene:
    background: tuple[int, int, int]
    objects: tuple[Obj, ...]
    relation: str | None = None    # None (one object) | "left" | "above"


# ---------------------------------------------------------------- sampling

def _sample_obj_attrs(rng: random.Random, shape: str | None = None, colour: str | None = None,
                      size: str | None = None, world: World = BASE,
                      ) -> tuple[str, str, tuple[int, int, int], int]:
    shape = shape or rng.choice(world.shapes)
    colour = colour or rng.choice(world.colours)
    size = size or rng.choice(("small", "large"))
    rgb = tuple(min(255, max(0, c + rng.randint(-JITTER, JITTER))) for c in world.palette[colour])
    side = rng.randint(*SIZE_RANGES[size])
    return shape, colour, rgb, side  # type: ignore[return-value]


def _place_pair(rng: random.Random, sa: int, sb: int, relation: str) -> tuple[int, int, int, int]:
    """Rejection-sample two boxes: a before b along the relation axis, gap >= 2, off-axis
    centre offset at most half the on-axis offset. Returns (xa, ya, xb, yb)."""
    while True:
        # sample in the relation's frame: u along the axis, v across it
        ua, ub = rng.randint(0, CANVAS - sa), rng.randint(0, CANVAS - sb)
        if ub < ua + sa + GAP:
            continue
        va, vb = rng.randint(0, CANVAS - sa), rng.randint(0, CANVAS - sb)
        du = (ub + sb / 2) - (ua + sa / 2)
        dv = (vb + sb / 2) - (va + sa / 2)
        if abs(dv) > du / 2:
            continue
        return (ua, va, ub, vb) if relation == "left" else (va, ua, vb, ub)


def sample_scene(rng: random.Random, n_objects: int | None = None, world: World = BASE) -> Scene:
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    n = n_objects or rng.choice((1, 2))
    attrs = [_sample_obj_attrs(rng, world=world) for _ in range(n)]
    return _place(rng, bg, attrs)  # type: ignore[arg-type]


def _place(rng: random.Random, bg: tuple[int, int, int], attrs: list, relation: str | None = None) -> Scene:
    if len(attrs) == 1:
        shape, colour, rgb, side = attrs[0]
        obj = Obj(shape, colour, rgb, rng.randint(0, CANVAS - side), rng.randint(0, CANVAS - side), side)
        return Scene(bg, (obj,), None)
    relation = relation or rng.choice(("left", "above"))
    (sha, ca, rgba, sa), (shb, cb, rgbb, sb) = attrs
    xa, ya, xb, yb = _place_pair(rng, sa, sb, relation)
    return Scene(bg, (Obj(sha, ca, rgba, xa, ya, sa), Obj(shb, cb, rgbb, xb, yb, sb)), relation)


def scene_from_caption(caption: str, rng: random.Random) -> Scene:
    """A random scene that the caption describes (ground truth for generate training)."""
    words = caption.split()
    phrases = [words[i:i + 4] for i in range(len(words)) if words[i] == "a"]
    attrs = [_sample_obj_attrs(rng, shape=p[3], colour=p[2], size=p[1]) for p in phrases]
    relation = None if len(attrs) == 1 else ("left" if "left" in words else "above")
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    return _place(rng, bg, attrs, relation)  # type: ignore[arg-type]


# ---------------------------------------------------------------- text targets

def phrase(o: Obj) -> str:
    return f"a {o.size} {o.colour} {o.shape}"


def caption(scene: Scene) -> str:
    if len(scene.objects) == 1:
        return phrase(scene.objects[0])
    a, b = scene.objects
    link = "to the left of" if scene.relation == "left" else "above"
    return f"{phrase(a)} {link} {phrase(b)}"


QUESTION_KINDS = ("count", "color", "shape", "size", "exists")


def questions(scene: Scene, world: World = BASE) -> dict[str, list[tuple[str, str]]]:
    """Every question the spec allows for this scene, grouped by kind: (question, answer)."""
    objs = scene.objects
    shapes = [o.shape for o in objs]
    colours = [o.colour for o in objs]
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in QUESTION_KINDS}
    out["count"].append(("how many shapes are there?", "one" if len(objs) == 1 else "two"))
    for o in objs:
        if shapes.count(o.shape) == 1:
            out["color"].append((f"what color is the {o.shape}?", o.colour))
        if colours.count(o.colour) == 1:
            out["shape"].append((f"what shape is the {o.colour} object?", o.shape))
            out["size"].append((f"what size is the {o.colour} {o.shape}?", o.size))
    present = {(o.colour, o.shape) for o in objs}
    for c, s in sorted(present):
        out["exists"].append((f"is there a {c} {s}?", "yes"))
    absent = [(c, s) for c in world.colours for s in world.shapes if (c, s) not in present]
    out["exists"].extend((f"is there a {c} {s}?", "no") for c, s in absent)
    return out


def sample_question(scene: Scene, rng: random.Random, world: World = BASE) -> tuple[str, str]:
    qs = questions(scene, world)
    kind = rng.choice([k for k in QUESTION_KINDS if qs[k]])
    if kind == "exists":  # balance yes/no rather than drowning "yes" among 16 absent combos
        want = rng.choice(("yes", "no"))
        pool = [qa for qa in qs[kind] if qa[1] == want] or qs[kind]
        return rng.choice(pool)
    return rng.choice(qs[kind])


# ---------------------------------------------------------------- layout tokens (generate)

def layout_values(scene: Scene) -> list[int | str]:
    """bg r,g,b then per object: shape, r, g, b, x0, y0, side. Colour channels are // 4 so that
    every value fits the 64 numeric tokens; ints become n<k> tokens, strings are words."""
    vals: list[int | str] = [c // 4 for c in scene.background]
    for o in scene.objects:
        vals += [o.shape, *(c // 4 for c in o.rgb), o.x0, o.y0, o.side]
    return vals


# ---------------------------------------------------------------- rendering (own renderer)

def _draw_obj(draw: ImageDraw.ImageDraw, o: Obj, s: float, fill) -> None:
    x0, y0, x1, y1 = o.x0 * s, o.y0 * s, (o.x0 + o.side) * s - 1, (o.y0 + o.side) * s - 1
    if o.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif o.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif o.shape == "diamond":  # vertices at the midpoints of the box's sides
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:  # isosceles: apex top centre, base along the bottom of the box
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def render(scene: Scene, size: int = CANVAS, supersample: int = 4) -> Image.Image:
    """Draw at size*supersample then box-downsample (anti-aliased); supersample=1 is aliased."""
    s = size / CANVAS * supersample
    big = Image.new("RGB", (round(CANVAS * s),) * 2, scene.background)
    draw = ImageDraw.Draw(big)
    for o in scene.objects:
        _draw_obj(draw, o, s, o.rgb)
    return big if supersample == 1 else big.resize((size, size), Image.BOX)


def coverage_mask(shape: str, side: int, margin: int = 2, supersample: int = 8) -> np.ndarray:
    """Anti-aliased coverage (side+2m, side+2m) of one shape whose box starts at (m, m):
    the renderer network's training target."""
    n = side + 2 * margin
    big = Image.new("L", (n * supersample,) * 2, 0)
    _draw_obj(ImageDraw.Draw(big), Obj(shape, "red", (0, 0, 0), margin, margin, side), supersample, 255)
    return np.asarray(big.resize((n, n), Image.BOX), dtype=np.float32) / 255.0


# ---------------------------------------------------------------- perturbations

@dataclass(frozen=True)
class Perturb:
    size: int = CANVAS
    supersample: int = 4
    jpeg_quality: int | None = None
    noise_sigma: float = 0.0


def random_perturb(rng: random.Random) -> Perturb:
    """What other renderers may do (spec): AA or not, 128/256 sizes, JPEG >= 70, noise <= 6."""
    size = rng.choice((64, 64, 128, 256))
    ss = rng.choice((1, 2, 3, 4)) if size < 256 else rng.choice((1, 2))
    q = rng.randint(70, 100) if rng.random() < 0.5 else None
    sigma = rng.uniform(0, 6) if rng.random() < 0.5 else 0.0
    return Perturb(size, ss, q, sigma)


def degrade(img: Image.Image, p: Perturb, rng: random.Random) -> Image.Image:
    if p.noise_sigma > 0:
        nrng = np.random.default_rng(rng.getrandbits(32))
        arr = np.asarray(img, dtype=np.float32) + nrng.normal(0, p.noise_sigma, (img.size[1], img.size[0], 3))
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if p.jpeg_quality is not None:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=p.jpeg_quality)
        buf.seek(0)
        img = Image.open(buf).convert("RGB")
    return img


def render_perturbed(scene: Scene, rng: random.Random, p: Perturb | None = None) -> Image.Image:
    p = p or random_perturb(rng)
    return degrade(render(scene, p.size, p.supersample), p, rng)


@dataclass
class Example:
    scene: Scene
    image: Image.Image                       # as the model sees it (64x64 RGB)
    caption: str
    question: str
    answer: str
    extra: dict = field(default_factory=dict)


def make_example(rng: random.Random, perturb: bool = True, world: World = BASE) -> Example:
    scene = sample_scene(rng, world=world)
    img = render_perturbed(scene, rng) if perturb else render(scene)
    q, a = sample_question(scene, rng, world)
    return Example(scene, resize_to_model(img), caption(scene), q, a)
