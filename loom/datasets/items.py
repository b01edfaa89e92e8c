"""Arrow record batches -> item dicts: which column is the image, the question, the prompt, the id,
and how each image value becomes an item field.

An *item* (what every reader yields, in lists of at most ``batch_size``) is a dict with:

- ``id``: str | None (the id column, a WebDataset key, or None),
- at most one image field: ``image_url`` (http/https URL), ``image_path`` (a local absolute path
  or an ``s3://bucket/key`` URI) or ``image_bytes`` (the encoded image),
- ``question`` / ``prompt`` when the source has them,
- ``metadata``: every column under its own name, JSON-safe (timestamps become ISO text): the id
  and text columns included, the image column too when it holds a path or URL (as given). Bytes
  never travel as metadata: an image column of bytes comes back from the stored input.
- ``columns``: the source's description (loom.datasets.columns), one object shared by its items.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loom.errors import InvalidRequest

if TYPE_CHECKING:
    import pyarrow as pa

IMAGE_NAMES = (
    "image", "img", "image_url", "url", "image_path", "path", "file", "filepath", "file_name",
    "jpg", "png", "webp", "picture", "photo",
)
QUESTION_NAMES = ("question", "query")
PROMPT_NAMES = ("prompt",)
ID_NAMES = ("id", "key", "__key__", "uid", "image_id")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm")


@dataclass(frozen=True)
class Columns:
    """The columns a table's items are made of (None: the table has none)."""

    image: str | None
    question: str | None
    prompt: str | None
    id: str | None


def _is_image_struct(t: pa.DataType) -> bool:
    import pyarrow as pa

    if not pa.types.is_struct(t):
        return False
    names = {t.field(i).name for i in range(t.num_fields)}
    return "bytes" in names


def _is_binary(t: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_binary(t) or pa.types.is_large_binary(t)
                or pa.types.is_fixed_size_binary(t) or pa.types.is_binary_view(t))


def _is_string(t: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_string(t) or pa.types.is_large_string(t)
                or pa.types.is_string_view(t))


def _looks_like_image_ref(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    v = value.strip().lower()
    if v.startswith(("http://", "https://", "s3://")):
        return True
    return v.split("?", 1)[0].endswith(IMAGE_EXTS)


def _pick(names: list[str], wanted: tuple[str, ...], given: str | None, what: str) -> str | None:
    if given is not None:
        if given not in names:
            raise InvalidRequest(
                f"--{what}-col {given!r}: no such column; the columns are {', '.join(names)}"
            )
        return given
    lower = {n.lower(): n for n in names}
    for w in wanted:
        if w in lower:
            return lower[w]
    return None


def detect_columns(
    schema: pa.Schema,
    sample: pa.RecordBatch | None = None,
    *,
    image_col: str | None = None,
    question_col: str | None = None,
    prompt_col: str | None = None,
    id_col: str | None = None,
    image_features: Iterable[str] = (),
) -> Columns:
    """Choose the image column: the one named, else an HF ``Image`` feature (``image_features``
    or a struct with a ``bytes`` field), else a binary column, else a string column whose first
    values look like URLs or image paths (a well-known name wins among candidates)."""
    names = list(schema.names)
    question = _pick(names, QUESTION_NAMES, question_col, "question")
    prompt = _pick(names, PROMPT_NAMES, prompt_col, "prompt")
    ident = _pick(names, ID_NAMES, id_col, "id")
    image = _pick(names, (), image_col, "image")
    if image is None:
        # Columns already taken as question/prompt/id are never guessed to be the image.
        free = [n for n in names if n not in (question, prompt, ident)]
        features = [n for n in image_features if n in free]
        structs = [n for n in free if _is_image_struct(schema.field(n).type)]
        binaries = [n for n in free if _is_binary(schema.field(n).type)]
        strings: list[str] = []
        for n in free:
            if not _is_string(schema.field(n).type) or sample is None:
                continue
            values = [v for v in sample.column(n).to_pylist()[:20] if v]
            if values and all(_looks_like_image_ref(v) for v in values):
                strings.append(n)
        for group in (features, structs, binaries, strings):
            if group:
                named = [n for n in group if n.lower() in IMAGE_NAMES]
                image = (named or group)[0]
                break
    return Columns(image=image, question=question, prompt=prompt, id=ident)


def json_safe(value: Any) -> Any:
    """Metadata values as JSON can carry them (item metadata is a JSON column)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None  # binary payloads never travel as metadata (they would bloat every row)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    return str(value)


def image_field(value: Any, base_dir: Path | None) -> dict[str, Any]:
    """One image value -> the item's image field (empty when the value is null)."""
    if value is None:
        return {}
    if isinstance(value, dict):  # the HF Image feature: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return {"image_bytes": bytes(value["bytes"])}
        return image_field(value.get("path"), base_dir)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"image_bytes": bytes(value)} if len(value) else {}
    text = str(value).strip()
    if not text:
        return {}
    if text.startswith("data:") and ";base64," in text:
        return {"image_bytes": base64.b64decode(text.split(",", 1)[1])}
    low = text.lower()
    if low.startswith(("http://", "https://")):
        return {"image_url": text}
    if low.startswith("s3://"):
        return {"image_path": text}
    if low.startswith("file://"):
        text = text[len("file://"):]
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return {"image_path": str(path.resolve())}


def batch_items(
    batch: pa.RecordBatch | pa.Table, cols: Columns, base_dir: Path | None,
    columns: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Convert one Arrow batch to items (column by column: to_pylist is the fast path).
    ``columns``: the source's description, attached to every item."""
    data = {name: batch.column(name).to_pylist() for name in batch.schema.names}
    meta_cols = [n for n in batch.schema.names
                 if n != cols.image or not (columns or {}).get("image_bytes")]
    out: list[dict[str, Any]] = []
    for i in range(batch.num_rows):
        item: dict[str, Any] = {}
        if cols.id:
            v = data[cols.id][i]
            item["id"] = None if v is None else str(v)
        else:
            item["id"] = None
        if cols.image:
            item.update(image_field(data[cols.image][i], base_dir))
        if cols.question and data[cols.question][i] is not None:
            item["question"] = str(data[cols.question][i])
        if cols.prompt and data[cols.prompt][i] is not None:
            item["prompt"] = str(data[cols.prompt][i])
        item["metadata"] = {n: json_safe(data[n][i]) for n in meta_cols}
        if columns is not None:
            item["columns"] = columns
        out.append(item)
    return out


def rebatch(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def limit_batches(
    batches: Iterable[list[dict[str, Any]]], limit: int
) -> Iterator[list[dict[str, Any]]]:
    """The first ``limit`` items; stops reading the source as soon as they are out."""
    left = limit
    for batch in batches:
        if left <= 0:
            return
        if len(batch) > left:
            batch = batch[:left]
        left -= len(batch)
        yield batch
        if left <= 0:
            return


def sample_items(
    batches: Iterable[list[dict[str, Any]]], n: int, *, seed: int | None = None
) -> list[dict[str, Any]]:
    """A uniform random ``n`` of the items (reservoir sampling: one pass, memory O(n)), in source
    order. The whole source is read once."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, dict[str, Any]]] = []
    seen = 0
    for batch in batches:
        for item in batch:
            if len(reservoir) < n:
                reservoir.append((seen, item))
            else:
                j = rng.randrange(seen + 1)
                if j < n:
                    reservoir[j] = (seen, item)
            seen += 1
    reservoir.sort(key=lambda p: p[0])
    return [item for _, item in reservoir]
