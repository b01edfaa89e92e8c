"""Result rows (``loom.exports.result_rows``) -> flat, typed records for Parquet / HF outputs, and
the WebDataset sample of a row.

The user's columns come first (loom.datasets.columns): a dataset's columns in order with their
types, then the other metadata keys, typed from the first row group. Loom's columns follow
(``LOOM``: status and error, the output, the inputs as Loom read them, provenance); one whose name
the user's columns already have is written as ``loom_<name>``. Metadata that does not fit those
columns later (a new key, another type) goes, as JSON, into ``metadata_extra``, so nothing is lost
and the schema stays fixed for streaming.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from loom.datasets.items import json_safe

if TYPE_CHECKING:
    import pyarrow as pa

# Loom's columns, name -> pyarrow type name (built lazily: pyarrow is imported only to write).
LOOM: tuple[tuple[str, str], ...] = (
    ("status", "string"), ("error_code", "string"), ("error_message", "string"),
    ("text", "string"), ("choices", "list<string>"), ("output_key", "string"), ("output_url", "string"),
    ("output_sha256", "string"), ("output_content_type", "string"),
    ("input_image", "string"), ("question", "string"), ("prompt", "string"),
    ("index", "int64"), ("item_id", "int64"), ("task", "string"),
    ("input_sha256", "string"), ("model", "string"), ("model_version", "string"),
    ("weights_sha256", "string"), ("seed", "int64"), ("attempt", "int64"),
    ("worker_id", "string"), ("timings", "string"), ("started_at", "timestamp"),
    ("finished_at", "timestamp"),
)
# Loom's echo of the inputs it read: left out when the user's columns hold them already.
ECHO = ("input_image", "question", "prompt")
EXTRA = "metadata_extra"


def row_id(row: dict[str, Any], id_col: str | None = None) -> str | None:
    """The input's id: the dataset's id column, else metadata ``id`` or ``__key__``, else the
    file name."""
    meta = row.get("metadata") or {}
    if not isinstance(meta, dict):
        return None
    for name in (id_col, "id", "__key__", "file"):
        if name and meta.get(name) is not None:
            return str(meta[name])
    return None


def loom_record(row: dict[str, Any], task: str) -> dict[str, Any]:
    """Loom's values of a row, under Loom's names (``LOOM``)."""
    inp, out = row.get("input") or {}, row.get("output") or {}
    err, lin = row.get("error") or {}, row.get("lineage") or {}
    timings = lin.get("timings")
    seed = lin.get("seed", inp.get("seed"))
    return {
        "index": row.get("index"), "item_id": row.get("item_id"),
        "task": task, "status": row.get("status"),
        "input_image": inp.get("image_url") or inp.get("image_key"),
        "question": inp.get("question"), "prompt": inp.get("prompt"),
        "text": out.get("text"), "choices": choices_of(row), "output_key": out.get("storage_key"),
        "output_url": out.get("url"), "output_sha256": out.get("sha256"),
        "output_content_type": out.get("content_type"),
        "error_code": err.get("code"), "error_message": err.get("message"),
        "input_sha256": lin.get("input_sha256"), "model": lin.get("model"),
        "model_version": lin.get("model_version"), "weights_sha256": lin.get("weights_sha256"),
        "seed": seed, "attempt": lin.get("attempt"), "worker_id": lin.get("worker_id"),
        "timings": json.dumps(timings, sort_keys=True) if timings else None,
        "started_at": row.get("started_at"), "finished_at": row.get("finished_at"),
    }


def choices_of(row: dict[str, Any]) -> list[str] | None:
    """An item's n outputs (a job with the ``n`` param): the output's ``choices``, else None."""
    found = ((row.get("lineage") or {}).get("details") or {}).get("choices")
    return [str(c) for c in found] if isinstance(found, list) else None


def arrow_type(name: str) -> pa.DataType:
    """A ``LOOM`` type name as a pyarrow type (timestamps: naive UTC, microseconds)."""
    import pyarrow as pa

    if name == "list<string>":
        return pa.list_(pa.string())
    return pa.timestamp("us") if name == "timestamp" else getattr(pa, name)()


def metadata_of(row: dict[str, Any]) -> dict[str, Any]:
    meta = row.get("metadata") or {}
    if not isinstance(meta, dict):
        return {"metadata": json_safe(meta)}
    return {k: json_safe(v) for k, v in meta.items()}


def infer_type(values: list[Any]) -> pa.DataType:
    """A column's type from its values (null-only or mixed columns become text)."""
    import pyarrow as pa

    try:
        t = pa.array(values).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        t = pa.string()
    return pa.string() if pa.types.is_null(t) else t


def typed_array(values: list[Any], t: pa.DataType) -> pa.Array:
    """``values`` as type ``t``; what metadata carried as text (timestamps as ISO text,
    decimals) is cast back. Raises when they do not fit."""
    import pyarrow as pa

    try:
        return pa.array(values, type=t)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
        return pa.array(values).cast(t)


def column_values(
    name: str, t: pa.DataType, values: list[Any], extras: list[dict[str, Any]] | None,
    key: str | None = None,
) -> pa.Array:
    """``values`` as an array of type ``t``; for a metadata column, values that do not fit become
    null here and move to their row's ``extras`` (``key`` is the metadata key)."""
    import pyarrow as pa

    try:
        return typed_array(values, t)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError,
            TypeError, ValueError):
        if extras is None or key is None:
            raise
    fixed: list[Any] = []
    for i, v in enumerate(values):
        try:
            typed_array([v], t)
            fixed.append(v)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError,
                OverflowError, TypeError, ValueError):
            fixed.append(None)
            extras[i][key] = v
    return typed_array(fixed, t)


def sample_key(row: dict[str, Any]) -> str:
    """WebDataset key: the item's index (unique and sortable; the id is in the json member)."""
    return f"{int(row.get('index') or 0):08d}"


def sample_json(row: dict[str, Any], task: str, id_col: str | None = None) -> dict[str, Any]:
    """Metadata + provenance of one row, for the ``{key}.json`` member."""
    out = {k: json_safe(v) for k, v in row.items()}
    out["task"] = task
    out["id"] = row_id(row, id_col)
    return out
