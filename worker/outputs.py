"""Turning model outputs into stored results with lineage (the engine's last stage).

Text outputs live in the item's Output row; image outputs are PNG objects under the deterministic
``output_key(...)`` and are uploaded BEFORE the database points at them (a re-run overwrites the
same key with the same bytes). The sha256 of the stored bytes is recorded either way.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loom import tasks
from loom.errors import LoomError, StorageError, StoreUnavailable
from worker.model_info import info_field

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

    from loom.jobs import ItemResult
    from loom.models import Output
    from loom.storage import Store
    from worker.inputs import Prepared

TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
PNG_CONTENT_TYPE = "image/png"


def upload(store: Store, key: str, data: bytes, content_type: str) -> None:
    """Put one output object. The store being down is an outage (StoreUnavailable: the engine
    gives the item back unspent and waits), not a failure of the item."""
    from loom.storage import is_outage

    try:
        store.put(key, data, content_type)
    except StorageError as exc:
        if is_outage(exc):
            raise StoreUnavailable(f"upload of {key} failed: {exc.message}") from exc
        raise
    except LoomError:
        raise
    except Exception as exc:  # boto/network errors that the store did not wrap
        raise StoreUnavailable(f"upload of {key} failed: {type(exc).__name__}: {exc}") from exc


class Text(str):
    """A text output with what its model said of it (``finish_reason``, ``choices``): kept in
    the output's details, so in lineage and the results."""

    details: dict[str, Any]

    def __new__(cls, value: str, details: dict[str, Any]) -> Text:
        out = super().__new__(cls, value)
        out.details = details
        return out


def choices(outs: list[Any]) -> Text:
    """One item's ``n`` outputs (a model called with ``n``) as its one text output: the first
    is the item's text, all n its ``choices``. Per-choice finish reasons are kept when they
    differ from the first's (a choice cut at the token limit beside ones that stopped)."""
    if not outs:
        raise ValueError("the model returned no choices for an item")
    texts = [str(o) for o in outs]
    reasons = [(getattr(o, "details", None) or {}).get("finish_reason") for o in outs]
    details: dict[str, Any] = {"choices": texts}
    if reasons[0] is not None:
        details["finish_reason"] = reasons[0]
    if len(set(reasons)) > 1:
        details["finish_reasons"] = reasons
    return Text(texts[0], details)


@dataclass(frozen=True)
class Cached:
    """A model output that was not computed: the earlier output it reuses. The result cache
    (worker/cache.py) hands these out in place of model outputs; ``store_output`` turns them
    into results, so the type lives here and the cache imports it."""

    output: Output


def _lineage(prep: Prepared, info: Any, timings: dict[str, float]) -> dict[str, Any]:
    return {
        "item_id": prep.item.id,
        "attempt": prep.item.attempts,  # the fence also checks the claim's attempt
        "input_sha256": prep.input_sha256,
        "model_name": str(info_field(info, "name", prep.item.model_name)),
        "model_version": str(info_field(info, "version", "unknown")),
        "weights_sha256": str(info_field(info, "weights_sha256", "")),
        "seed": prep.seed,
        "timings": {k: round(float(v), 3) for k, v in timings.items()},
        "cache_key": prep.cache_key,
    }


def text_result(prep: Prepared, text: str, info: Any, timings: dict[str, float]) -> ItemResult:
    from loom.jobs import ItemResult

    data = text.encode("utf-8")
    return ItemResult(
        kind="text",
        text=text,
        storage_key=None,
        content_type=TEXT_CONTENT_TYPE,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        **_lineage(prep, info, timings),
    )


def image_result(
    prep: Prepared, image: Image, info: Any, timings: dict[str, float], *, store: Store
) -> ItemResult:
    """Encode ``image`` as PNG, upload it under the item's output key, then describe it."""
    from loom import media
    from loom.jobs import ItemResult
    from loom.storage import output_key

    item = prep.item
    t_encode = time.perf_counter()
    data = media.encode_png(image)
    key = output_key(item.tenant_id, item.job_id, item.index, "png")
    t0 = time.perf_counter()
    upload(store, key, data, PNG_CONTENT_TYPE)
    timings = {**timings, "encode_ms": (t0 - t_encode) * 1000.0,
               "upload_ms": (time.perf_counter() - t0) * 1000.0}
    return ItemResult(
        kind="image",
        text=None,
        storage_key=key,
        content_type=PNG_CONTENT_TYPE,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        **_lineage(prep, info, timings),
    )


NPY_CONTENT_TYPE = "application/x-npy"


def vector_result(
    prep: Prepared, vector: Any, info: Any, timings: dict[str, float], *, store: Store
) -> ItemResult:
    """Store a vector compactly, as a float32 ``.npy`` object (never JSON text)."""
    import io

    import numpy as np

    from loom.jobs import ItemResult
    from loom.storage import output_key

    item = prep.item
    arr = np.asarray(vector, dtype=np.float32).reshape(-1)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    data = buf.getvalue()
    key = output_key(item.tenant_id, item.job_id, item.index, "npy")
    t0 = time.perf_counter()
    upload(store, key, data, NPY_CONTENT_TYPE)
    timings = {**timings, "upload_ms": (time.perf_counter() - t0) * 1000.0}
    return ItemResult(
        kind="vector",
        text=None,
        storage_key=key,
        content_type=NPY_CONTENT_TYPE,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        **_lineage(prep, info, timings),
    )


def cached_result(prep: Prepared, cached: Cached, timings: dict[str, float]) -> ItemResult:
    """An item answered by an earlier output: the same text or object, its model lineage, and
    ``cached_from`` naming it; nothing is inferred or uploaded."""
    from loom.jobs import ItemResult

    row = cached.output
    return ItemResult(
        item_id=prep.item.id, attempt=prep.item.attempts, kind=row.kind, text=row.text,
        storage_key=row.storage_key, content_type=row.content_type, sha256=row.sha256,
        size_bytes=row.size_bytes, input_sha256=prep.input_sha256, model_name=row.model_name,
        model_version=row.model_version, weights_sha256=row.weights_sha256, seed=prep.seed,
        timings={k: round(float(v), 3) for k, v in timings.items()
                 if k in ("fetch_ms", "decode_ms")},
        cache_key=prep.cache_key, cached_from=row.id,
        # The original's details (its choices, finish reason, endpoint), as its text is reused.
        details=dict(row.details) if row.details else None,
    )


def store_output(
    kind: str, prep: Prepared, out: Any, info: Any, timings: dict[str, float], *, store: Store
) -> ItemResult:
    """The result of one output of the task's output kind (``TaskSpec.output``), or of a
    cached one (``Cached``)."""
    if isinstance(out, Cached):
        return cached_result(prep, out, timings)
    if kind == "text":
        result = text_result(prep, str(out), info, timings)
    elif kind == "image":
        result = image_result(prep, out, info, timings, store=store)
    elif kind == "vector":
        result = vector_result(prep, out, info, timings, store=store)
    else:
        raise ValueError(f"no output handler for kind {kind!r}")
    result.details = details(prep, out, info)
    return result


def details(prep: Prepared, out: Any, info: Any) -> dict[str, Any] | None:
    """What lineage keeps beyond the model's name: the instruction this row's prompt template
    became, the model's ``info.details`` (a remote endpoint, its served model id,
    ``weights_verified``) and the output's own (``finish_reason``)."""
    found: dict[str, Any] = {}
    if "prompt" in prep.texts and "prompt" not in tasks.get(prep.item.task).texts:
        found["prompt"] = prep.texts["prompt"]
    found.update(info_field(info, "details", None) or {})
    found.update(getattr(out, "details", None) or {})
    return found or None
