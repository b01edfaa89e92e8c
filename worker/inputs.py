"""Reading and decoding one item's input, ready for the model (the engine's first stage).

Runs in the engine's I/O thread pool. Every problem with one input becomes a ``LoomError`` on that
item (``Prepared.error``): the batch, the chunk and the worker carry on. A store that is down is
no problem of the input: it becomes ``StoreUnavailable``, which the engine never writes to the
item (it gives the lease back, waits for the store and claims the item again).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loom import tasks
from loom.config import Settings
from loom.errors import (
    InputMismatch,
    InputTooLarge,
    InvalidInput,
    LoomError,
    StorageError,
    StoreUnavailable,
    UnsupportedTask,
)
from loom.task_params import fill_prompt

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

    from loom.jobs import ClaimedItem
    from loom.storage import Store

derive_seed = tasks.derive_seed  # the seed policy lives in loom.tasks


@dataclass
class Prepared:
    """One claimed item with its decoded input, or the error that ends/delays it."""

    item: ClaimedItem
    image: Image | None = None
    texts: dict[str, str] = field(default_factory=dict)  # the task's text inputs by name
    seed: int | None = None
    input_sha256: str | None = None
    cache_key: str | None = None  # set by the result cache once the model's weights are known
    timings: dict[str, float] = field(default_factory=dict)
    error: LoomError | None = None
    data: bytes | None = None  # read by ``load``, not decoded yet (``decode_input``)
    raw: bytes | None = None  # the input's bytes as read (what a remote model is sent)

    @property
    def ok(self) -> bool:
        return self.error is None


def read_bytes(item: ClaimedItem, *, settings: Settings, store: Store) -> bytes:
    """The input image's bytes: from the object store (``image_key``) or a URL (``image_url``)."""
    from loom import media

    from loom.storage import is_outage

    inp = item.input
    if inp.get("image_key"):
        key = str(inp["image_key"])
        try:
            data = store.get(key)
        except StorageError as exc:
            if is_outage(exc):
                raise StoreUnavailable(f"cannot read {key}: {exc.message}") from exc
            raise
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
    """Read + decode one item's input as its task's spec says. Never raises for input problems
    (they land in ``error``)."""
    return decode_input(load(item, settings=settings, store=store), settings=settings)


def load(item: ClaimedItem, *, settings: Settings, store: Store) -> Prepared:
    """The first half of ``prepare``: check the input, read its bytes (kept in ``data`` for
    ``decode_input``). Never raises for input problems (they land in ``error``)."""
    prep = Prepared(item=item)
    try:
        spec = tasks.REGISTRY.get(item.task)
        if spec is None:
            raise UnsupportedTask(
                f"unknown task {item.task!r}; expected one of {', '.join(tasks.names())}")
        inp = spec.validate_input(item.input, where="input",
                                  max_text_chars=settings.max_text_chars, error=InvalidInput)
        prep.texts = {name: inp[name] for name in spec.texts}
        template = item.params.get("prompt") if spec.param("prompt") else None
        if isinstance(template, str):
            # This row's instruction: part of what its output answers (dedupe, cache, lineage).
            prep.texts["prompt"] = fill_prompt(template, item.metadata)
        if spec.seeded:
            prep.seed = inp.get("seed")
            if prep.seed is None:
                prep.seed = tasks.derive_seed(item.job_id, item.index)
        elif item.params.get("seed") is not None:  # sampling: item i samples with seed + i
            prep.seed = tasks.item_seed(given=None, base=item.params["seed"], index=item.index)
        if not spec.image:
            text = "\n".join(prep.texts.values())
            prep.input_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
            return prep
        t0 = time.perf_counter()
        data = read_bytes(item, settings=settings, store=store)
        prep.timings["fetch_ms"] = (time.perf_counter() - t0) * 1000.0
        prep.input_sha256 = hashlib.sha256(data).hexdigest()
        expected = item.input.get("sha256")
        if expected and str(expected).lower() != prep.input_sha256:
            # What was read vs what the item expects: the object changed after submission.
            raise InputMismatch(
                f"input sha256 is {prep.input_sha256}; the item expects {expected}"
            )
        prep.data = prep.raw = data
    except Exception as exc:
        prep.error = _as_item_error(exc)
    return prep


def decode_input(prep: Prepared, *, settings: Settings) -> Prepared:
    """The second half of ``prepare``: decode the bytes ``load`` read (if any) into the image.
    Never raises for input problems (they land in ``error``)."""
    data, prep.data = prep.data, None
    if data is None or prep.error is not None:
        return prep
    t0 = time.perf_counter()
    try:
        prep.image = decode(data, settings=settings)
    except Exception as exc:
        prep.error = _as_item_error(exc)
    prep.timings["decode_ms"] = (time.perf_counter() - t0) * 1000.0
    return prep


def _as_item_error(exc: Exception) -> LoomError:
    if isinstance(exc, LoomError):
        return exc
    # Unexpected: fail this item (retryable), not the batch.
    err = LoomError(f"unexpected error reading input: {type(exc).__name__}: {exc}")
    err.transient = True
    return err
