"""Image preprocessing shared by serving, training and evaluation (one definition, no drift)."""
from __future__ import annotations

import numpy as np
from PIL import Image

MODEL_SIZE = 64


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB; transparency is composited over white (how a viewer would show it)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_to_model(img: Image.Image, size: int = MODEL_SIZE) -> Image.Image:
    img = to_rgb(img)
    if img.size == (size, size):
        return img
    # BOX averages whole source pixels when shrinking (128/256 inputs), which reproduces the
    # anti-aliased 64x64 view; bilinear is the sensible choice when enlarging.
    shrinking = img.size[0] >= size and img.size[1] >= size
    return img.resize((size, size), Image.BOX if shrinking else Image.BILINEAR)


def to_array(img: Image.Image, size: int = MODEL_SIZE) -> np.ndarray:
    """PIL image -> float32 array (3, size, size) in [-1, 1]."""
    arr = np.asarray(resize_to_model(img, size), dtype=np.float32)
    return (arr.transpose(2, 0, 1) / 127.5) - 1.0


def batch_array(images: list[Image.Image], size: int = MODEL_SIZE) -> np.ndarray:
    return np.stack([to_array(im, size) for im in images]) if images else np.zeros((0, 3, size, size), np.float32)
