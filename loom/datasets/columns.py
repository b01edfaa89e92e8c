"""The user's columns: what a dataset source looked like, so that its results join back to it.

A reader describes its source once (``describe``): the column names in order, the Arrow schema
(the exact types), and which column holds the image, the id, the question and the prompt. The
submitter records that description in the job's metadata under ``"columns"``; every item's
metadata carries the row's values under the columns' own names (the id as given, an int stays an
int), except an image column of bytes, whose bytes are the item's stored input. On the way out,
the table writers put the user's columns first, in order and with their types, then Loom's
output and provenance columns; a Loom column whose name the user's table already has is written
as ``loom_<name>`` (``loom_status``, ``loom_text``, ...).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

    from loom.datasets.items import Columns

PREFIX = "loom_"  # Loom's column names, when the user's table has one of the same name
KEY = "columns"  # where the description lives in the job's metadata


def describe(schema: pa.Schema, cols: Columns, fmt: str) -> dict[str, Any]:
    """The description of a table source (JSON-safe: it is stored with the job)."""
    import pyarrow as pa

    image_bytes = False
    if cols.image is not None:
        t = schema.field(cols.image).type
        image_bytes = (pa.types.is_binary(t) or pa.types.is_large_binary(t)
                       or pa.types.is_struct(t))
    return {
        "format": fmt,
        "names": list(schema.names),
        "schema": base64.b64encode(schema.remove_metadata().serialize().to_pybytes()).decode(),
        "image": cols.image, "image_bytes": image_bytes, "id": cols.id,
        "question": cols.question, "prompt": cols.prompt,
    }


def describe_fields(names: Iterable[str], *, fmt: str, image: str | None, id_: str | None,
                    question: str | None = None, prompt: str | None = None) -> dict[str, Any]:
    """The description of a source without an Arrow schema (WebDataset samples): names only;
    the types are inferred from the values on the way out."""
    return {"format": fmt, "names": list(names), "schema": None, "image": image,
            "image_bytes": image is not None, "id": id_, "question": question,
            "prompt": prompt}


def of_job(job: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The description recorded with a job (``job_dict``), or None (not from a table)."""
    meta = (job or {}).get("metadata") or {}
    found = meta.get(KEY) if isinstance(meta, Mapping) else None
    return found if isinstance(found, dict) and found.get("names") else None


def schema_of(columns: Mapping[str, Any]) -> pa.Schema | None:
    import pyarrow as pa

    raw = columns.get("schema")
    if not raw:
        return None
    try:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(raw)))
    except (ValueError, pa.ArrowInvalid):
        return None


def names(columns: Mapping[str, Any] | None) -> list[str]:
    return list((columns or {}).get("names") or [])


def loom_name(name: str, taken: Iterable[str]) -> str:
    """Loom's column ``name``, prefixed when the user's columns already have it."""
    return f"{PREFIX}{name}" if name in set(taken) else name


def user_values(row: Mapping[str, Any], columns: Mapping[str, Any], *,
                image: Any = None) -> dict[str, Any]:
    """A result row's values of the user's columns, in order. The image column of bytes takes
    ``image`` (its bytes read back from the store, or None when dropped)."""
    meta = row.get("metadata") or {}
    out: dict[str, Any] = {}
    for name in names(columns):
        if name == columns.get("image") and columns.get("image_bytes"):
            out[name] = image
        else:
            out[name] = meta.get(name) if isinstance(meta, Mapping) else None
    return out
