"""Result rows (``loom.exports.result_rows``) -> flat, typed records for Parquet / HF outputs, and
the WebDataset sample of a row.

Fixed columns (``FIXED``) come first; the item's metadata keys follow as their own columns, typed
from the first row group (a key that collides with a fixed column is written as ``meta_<key>``);
metadata that does not fit those columns later (a new key, another type) goes, as JSON, into
``metadata_extra``, so nothing is lost and the schema stays fixed for streaming.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from loom.datasets.items import json_safe

if TYPE_CHECKING:
    import pyarrow as pa

# name -> pyarrow type name (built lazily: pyarrow is imported only when writing)
FIXED: tuple[tuple[str, str], ...] = (
    ("index", "int64"), ("item_id", "int64"), ("id", "string"), ("task", "string"),
    ("status", "string"),
    ("input_image", "string"), ("question", "string"), ("prompt", "string"),
    ("text", "string"), ("output_key", "string"), ("output_url", "string"),
    ("output_sha256", "string"), ("output_content_type", "string"),
    ("error_code", "string"), ("error_message", "string"),
    ("input_sha256", "string"), ("model", "string"), ("model_version", "string"),
    ("weights_sha256", "string"), ("seed", "int64"), ("attempt", "int64"),
    ("worker_id", "string"), ("timings", "string"), ("started_at", "timestamp"),
    ("finished_at", "timestamp"),
)
FIXED_NAMES = frozenset(n for n, _ in FIXED) | {"metadata_extra", "image"}
EXTRA = "metadata_extra"


def row_id(row: dict[str, Any]) -> str | None:
    """The input's id: metadata ``id`` (what the dataset readers give), else the file name."""
    meta = row.get("metadata") or {}
    value = meta.get("id") if isinstance(meta, dict) else None
    if value is None and isinstance(meta, dict):
        value = meta.get("file")
    return None if value is None else str(value)


def meta_column(key: str) -> str:
    return f"meta_{key}" if key in FIXED_NAMES else key


def fixed_record(row: dict[str, Any], task: str) -> dict[str, Any]:
    inp, out = row.get("input") or {}, row.get("output") or {}
    err, lin = row.get("error") or {}, row.get("lineage") or {}
    timings = lin.get("timings")
    seed = lin.get("seed", inp.get("seed"))
    return {
        "index": row.get("index"), "item_id": row.get("item_id"), "id": row_id(row),
        "task": task, "status": row.get("status"),
        "input_image": inp.get("image_url") or inp.get("image_key"),
        "question": inp.get("question"), "prompt": inp.get("prompt"),
        "text": out.get("text"), "output_key": out.get("storage_key"),
        "output_url": out.get("url"), "output_sha256": out.get("sha256"),
        "output_content_type": out.get("content_type"),
        "error_code": err.get("code"), "error_message": err.get("message"),
        "input_sha256": lin.get("input_sha256"), "model": lin.get("model"),
        "model_version": lin.get("model_version"), "weights_sha256": lin.get("weights_sha256"),
        "seed": seed, "attempt": lin.get("attempt"), "worker_id": lin.get("worker_id"),
        "timings": json.dumps(timings, sort_keys=True) if timings else None,
        "started_at": row.get("started_at"), "finished_at": row.get("finished_at"),
    }


def arrow_type(name: str) -> pa.DataType:
    """A FIXED type name as a pyarrow type (timestamps: naive UTC, microseconds)."""
    import pyarrow as pa

    return pa.timestamp("us") if name == "timestamp" else getattr(pa, name)()


def metadata_of(row: dict[str, Any]) -> dict[str, Any]:
    meta = row.get("metadata") or {}
    if not isinstance(meta, dict):
        return {"metadata": json_safe(meta)}
    return {k: json_safe(v) for k, v in meta.items() if k != "id"}


def infer_meta_schema(metas: list[dict[str, Any]]) -> list[pa.Field]:
    """Metadata columns and types from the first row group (null-only columns become text)."""
    import pyarrow as pa

    keys: dict[str, None] = {}
    for m in metas:
        keys.update(dict.fromkeys(m))
    fields: list[pa.Field] = []
    for key in keys:
        values = [m.get(key) for m in metas]
        try:
            t = pa.array(values).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            t = pa.string()
        if pa.types.is_null(t):
            t = pa.string()
        fields.append(pa.field(meta_column(key), t))
    return fields


def column_values(
    name: str, t: pa.DataType, values: list[Any], extras: list[dict[str, Any]] | None,
    key: str | None = None,
) -> pa.Array:
    """``values`` as an array of type ``t``; for a metadata column, values that do not fit become
    null here and move to their row's ``extras`` (``key`` is the metadata key)."""
    import pyarrow as pa

    try:
        return pa.array(values, type=t)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
        if extras is None or key is None:
            raise
    fixed: list[Any] = []
    for i, v in enumerate(values):
        try:
            pa.array([v], type=t)
            fixed.append(v)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
            fixed.append(None)
            extras[i][key] = v
    return pa.array(fixed, type=t)


def sample_key(row: dict[str, Any]) -> str:
    """WebDataset key: the item's index (unique and sortable; the id is in the json member)."""
    return f"{int(row.get('index') or 0):08d}"


def sample_json(row: dict[str, Any], task: str) -> dict[str, Any]:
    """Metadata + provenance of one row, for the ``{key}.json`` member."""
    out = {k: json_safe(v) for k, v in row.items()}
    out["task"] = task
    out["id"] = row_id(row)
    return out
