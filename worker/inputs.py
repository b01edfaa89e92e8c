"""Reading and decoding one item's input, ready for the model (the engine's first stage).

Runs in the engine's I/O thread pool. Every problem with one input becomes a ``LoomError`` on that
item (``Prepared.error``): the batch, the chunk and the worker carry on.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loom.config import Settings
from loom.errors import InputTooLarge, InvalidInput, LoomError, UnsupportedTask

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

    from loom.jobs import ClaimedItem
    from loom.storage import Store

TASKS = ("caption", "vqa", "generate")
SEED_MAX = 2**31 - 1


@dataclass
class Prepared:
    """One claimed item with its decoded input, or the error that ends/delays it."""

    item: ClaimedItem
    image: Image | None = None
    question: str | None = None
    prompt: str | None = None
    seed: int | None = None
    input_sha256: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: LoomError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def derive_seed(job_id: str, index: int) -> int:
    """The generation seed when the submitter did not set one: stable per (job, index)."""
    digest = hashlib.sha256(f"{job_id}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MAX


def _text(inp: dict[str, Any], key: str, task: str, max_chars: int) -> str:
    value = inp.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{task} needs a non-empty '{key}' string")
    if len(value) > max_chars:
        raise InvalidInput(f"'{key}' is longer than {max_chars} characters")
    return value


def _seed(item: ClaimedItem) -> int:
    raw = item.input.get("seed")
    if raw is None:
        return derive_seed(item.job_id, item.index)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise InvalidInput(f"seed must be a non-negative integer, got {raw!r}")
    return raw


def read_bytes(item: ClaimedItem, *, settings: Settings, store: Store) -> bytes:
    """The input image's bytes: from the object store (``image_key``) or a URL (``image_url``)."""
    from loom import media

    inp = item.input
    if inp.get("image_key"):
        data = store.get(str(inp["image_key"]))
    elif inp.get("image_url"):
        data = media.fetch_url(
            str(inp["image_url"]),
            allow_private=settings.allow_private_urls,
            timeout=settings.fetch_timeout_seconds,
            max_bytes=settings.max_input_bytes,
        )
    else:
        raise InvalidInput(f"{item.task} needs an image (image_key or image_url)")
    if len(data) > settings.max_input_bytes:
        raise InputTooLarge(
            f"input is {len(data)} bytes; the limit is {settings.max_input_bytes} bytes"
        )
    return data


def decode(data: bytes, *, settings: Settings) -> Image:
    from loom import media

    if not data:
        raise InvalidInput("input is empty (0 bytes)")
    try:
        return media.decode_image(data, max_pixels=settings.max_image_pixels)
    except LoomError:
        raise
    except Exception as exc:  # a decoder bug must not take the worker down with it
        raise InvalidInput(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


def prepare(item: ClaimedItem, *, settings: Settings, store: Store) -> Prepared:
    """Read + decode one item's input. Never raises for input problems (they land in ``error``)."""
    prep = Prepared(item=item)
    try:
        task = item.task
        if task not in TASKS:
            raise UnsupportedTask(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        if task == "generate":
            prep.prompt = _text(item.input, "prompt", task, settings.max_text_chars)
            prep.seed = _seed(item)
            prep.input_sha256 = hashlib.sha256(prep.prompt.encode("utf-8")).hexdigest()
            return prep
        if task == "vqa":
            prep.question = _text(item.input, "question", task, settings.max_text_chars)
        t0 = time.perf_counter()
        data = read_bytes(item, settings=settings, store=store)
        t1 = time.perf_counter()
        prep.input_sha256 = hashlib.sha256(data).hexdigest()
        prep.image = decode(data, settings=settings)
        t2 = time.perf_counter()
        prep.timings = {"fetch_ms": (t1 - t0) * 1000.0, "decode_ms": (t2 - t1) * 1000.0}
    except LoomError as exc:
        prep.error = exc
    except Exception as exc:  # unexpected: fail this item (retryable), not the batch
        err = LoomError(f"unexpected error reading input: {type(exc).__name__}: {exc}")
        err.transient = True
        prep.error = err
    return prep
