"""What every result writer shares: the result of a write, a byte sink for streamed responses,
and the functions that fetch a row's image and vector from the store."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loom.storage import Store

# (bytes, extension) of the image that goes with a row, or None.
ImageFn = Callable[[dict[str, Any]], "tuple[bytes, str] | None"]
# The stored vector of a row whose output is a vector (the embed task): its .npy bytes.
VectorFn = Callable[[dict[str, Any]], "bytes | None"]


@dataclass
class WriteResult:
    rows: int = 0
    paths: list[Path] = field(default_factory=list)


class Sink(io.RawIOBase):
    """A write-only file that keeps what was written until ``drain()`` (for streamed responses)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._buf += data
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def drain(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


def store_images(store: Store, *, inputs: bool = True) -> ImageFn:
    """Image bytes from the store: a generated output, else (``inputs``) the stored input image.
    URL inputs are not fetched (their URL is in the row). Stored bytes that are no image (an
    item that failed for it) come back as they are, with the extension "bin"."""
    from loom import media
    from loom.errors import LoomError

    def image(row: dict[str, Any]) -> tuple[bytes, str] | None:
        out = row.get("output") or {}
        key = out.get("storage_key") if out.get("kind") == "image" else None
        if key is None and inputs:
            key = (row.get("input") or {}).get("image_key")
        if not key:
            return None
        try:
            data = store.get(key)
        except LoomError:
            return None
        try:
            return data, media.image_format(data)
        except LoomError:  # not an image (its item failed): still the bytes the user gave
            return (data, "bin") if data else None

    return image


def store_vectors(store: Store) -> VectorFn:
    """The ``.npy`` bytes of a row's vector output (None for other outputs)."""
    from loom.errors import LoomError

    def vector(row: dict[str, Any]) -> bytes | None:
        out = row.get("output") or {}
        if out.get("kind") != "vector" or not out.get("storage_key"):
            return None
        try:
            return store.get(out["storage_key"])
        except LoomError:
            return None

    return vector


def npy_values(data: bytes | None) -> list[float] | None:
    """A stored ``.npy`` vector as a list of floats (for a Parquet list<float32> column)."""
    if data is None:
        return None
    import io

    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32).ravel().tolist()
