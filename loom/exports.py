"""Results as JSONL, CSV or COCO, streamed: rows are read from the database in pages.

A *result row* (what ``result_rows`` yields and the JSONL export writes) is one item:
``{"index", "item_id", "status", "metadata", "input", "output": {"id", "kind", "text",
"storage_key", "url", "content_type", "sha256", "size_bytes"} | None, "error": {"code",
"message"} | None, "lineage": {"model", "model_version", "weights_sha256", "seed", "attempt",
"worker_id"} | None}``. ``with_url`` fills ``output.url`` (presigned or API content URL).
"""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from sqlalchemy.orm import Session

from loom import tasks
from loom.datasets import columns
from loom.datasets.records import choices_of
from loom.errors import InvalidRequest

PAGE = 1000
MEDIA_TYPES: dict[str, tuple[str, str]] = {
    "jsonl": ("application/x-ndjson", "jsonl"),
    "csv": ("text/csv", "csv"),
    "coco": ("application/json", "json"),
    # Written by loom.datasets (every column; WebDataset embeds the images).
    "parquet": ("application/vnd.apache.parquet", "parquet"),
    "webdataset": ("application/x-tar", "tar"),
}
CSV_COLUMNS = (
    "index", "item_id", "status", "file", "image", "question", "prompt", "seed", "text",
    "output_url", "error_code", "error_message", "model", "model_version",
)


def result_rows(
    session: Session, *, job_id: str, tenant_id: str | None = None, page: int = PAGE
) -> Iterator[dict[str, Any]]:
    """Every item of the job in index order with its output (``loom.jobs.iter_results``, which
    reads one page at a time). Raises NotFound for another tenant's job."""
    from loom import jobs

    for item, output in jobs.iter_results(
        session, job_id=job_id, tenant_id=tenant_id, page_size=page
    ):
        yield jobs.result_row(item, output)


def with_url(row: dict[str, Any], url_for: Callable[[Any], str | None]) -> dict[str, Any]:
    """Fill ``output.url`` for image outputs; ``url_for`` receives an object with ``id`` and
    ``storage_key`` attributes (an Output row or a stand-in)."""
    out = row.get("output")
    if out and out.get("storage_key"):

        class _Ref:
            id = out["id"]
            storage_key = out["storage_key"]

        out["url"] = url_for(_Ref)
    return row


def file_name(row: dict[str, Any]) -> str | None:
    meta = row.get("metadata") or {}
    inp = row.get("input") or {}
    name = meta.get("file") if isinstance(meta, dict) else None
    return name or inp.get("image_url") or inp.get("image_key")


# --- formats -----------------------------------------------------------------------------------
#
# Two views of the same rows: "full" (every field, what ``loom results`` and the API give by
# default) and "table" (the task's own columns from its TaskSpec: the item's metadata, its text
# inputs, the seed when seeded, and the output column; what the embedded commands write).

VIEWS = ("full", "table")


def jsonl_lines(rows: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    for row in rows:
        yield (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode()


def csv_record(row: dict[str, Any]) -> dict[str, Any]:
    inp, out = row.get("input") or {}, row.get("output") or {}
    err, lin = row.get("error") or {}, row.get("lineage") or {}
    rec = {
        "index": row.get("index"), "item_id": row.get("item_id"), "status": row.get("status"),
        "file": (row.get("metadata") or {}).get("file"),
        "image": inp.get("image_url") or inp.get("image_key"),
        "seed": lin.get("seed", inp.get("seed")), "text": out.get("text"),
        "output_url": out.get("url"), "error_code": err.get("code"),
        "error_message": err.get("message"), "model": lin.get("model"),
        "model_version": lin.get("model_version"),
    }
    rec.update({name: inp.get(name) for name in TEXT_INPUTS})
    return rec


TEXT_INPUTS = tuple(dict.fromkeys(t for s in tasks.inference() for t in s.texts))
CSV_COLUMNS = ("index", "item_id", "status", "file", "image", *TEXT_INPUTS, "seed", "text",
               "output_url", "error_code", "error_message", "model", "model_version")


def output_value(row: dict[str, Any], spec: tasks.TaskSpec) -> Any:
    """The output as the task's table column holds it: the text, or where the object is."""
    out = row.get("output") or {}
    if spec.output == "text":
        return out.get("text")
    return out.get("url") or out.get("storage_key")


def table_record(row: dict[str, Any], spec: tasks.TaskSpec,
                 described: dict[str, Any] | None = None, *, image: Any = None,
                 drop_image: bool = False, choices: bool = False) -> dict[str, Any]:
    """A row as the task's table shows it: the user's columns first (a dataset's columns in
    order, under their own names; else the item's metadata), the inputs Loom read that are not
    among them, then Loom's columns (the seed, the output, ``status``, ``error_code``,
    ``error_message``), each prefixed ``loom_`` when the user's columns have that name.
    ``image``: the value of a source image column of bytes (base64 text); ``drop_image``: leave
    the source's image column out; ``choices``: the job asked for n outputs per item, kept in a
    ``choices`` column after the output's."""
    meta = row.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    if described:
        rec = columns.user_values(row, described, image=image)
        rec.update({k: v for k, v in meta.items() if k not in rec})
        if drop_image and described.get("image"):
            rec.pop(described["image"], None)
    else:
        rec = dict(meta)
    taken = set(rec)
    if drop_image and described and described.get("image"):
        taken.add(described["image"])
    inp = row.get("input") or {}
    for name in spec.texts:
        if name not in taken:
            rec[name] = inp.get(name)
    loom: dict[str, Any] = {}
    if spec.seeded:
        loom["seed"] = (row.get("lineage") or {}).get("seed", inp.get("seed"))
    err = row.get("error") or {}
    loom[spec.output_column] = output_value(row, spec)
    if choices:
        loom["choices"] = choices_of(row)
    loom.update({"status": row.get("status"), "error_code": err.get("code"),
                 "error_message": err.get("message")})
    for name, value in loom.items():
        rec[columns.loom_name(name, taken)] = value
    return rec


def csv_lines(
    records: Iterable[dict[str, Any]], columns: Iterable[str] | None = CSV_COLUMNS
) -> Iterator[bytes]:
    """CSV of flat records (header first); values None become empty cells, lists and dicts
    JSON. ``columns`` None: the first record's keys."""
    it = iter(records)
    first = next(it, None)
    cols = list(first or {}) if columns is None else list(columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rec in itertools.chain([] if first is None else [first], it):
        writer.writerow({k: _cell(rec.get(k)) for k in cols})
        if buf.tell() > 64 * 1024:
            yield buf.getvalue().encode()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue().encode()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return value


SizeFn = Callable[[dict[str, Any]], "tuple[int, int] | None"]
# (bytes, extension) of a row's stored input image (loom.datasets.store_images).
ImageFn = Callable[[dict[str, Any]], "tuple[bytes, str] | None"]


def metadata_size(row: dict[str, Any]) -> tuple[int, int] | None:
    """(width, height) from the item's metadata, when the source gave them."""
    meta = row.get("metadata") or {}
    w, h = (meta.get("width"), meta.get("height")) if isinstance(meta, dict) else (None, None)
    if isinstance(w, int) and isinstance(h, int) and not isinstance(w, bool):
        return w, h
    return None


def store_size(store: Any) -> SizeFn:
    """(width, height) read from the image's header in ``store``: the output of a generate job,
    else the stored input; metadata width/height first; None for URL inputs."""
    from PIL import Image, UnidentifiedImageError

    from loom.errors import LoomError

    def size(row: dict[str, Any]) -> tuple[int, int] | None:
        known = metadata_size(row)
        if known:
            return known
        out = row.get("output") or {}
        key = out.get("storage_key") if out.get("kind") == "image" else None
        key = key or (row.get("input") or {}).get("image_key")
        if not key:
            return None
        try:
            with Image.open(io.BytesIO(store.get(key))) as im:  # reads the header only
                return int(im.width), int(im.height)
        except (LoomError, UnidentifiedImageError, OSError):
            return None

    return size


def coco_chunks(
    rows: Iterable[dict[str, Any]], job: dict[str, Any], size_of: SizeFn | None = None
) -> Iterator[bytes]:
    """A COCO captions document. Tasks with image outputs: the images are the outputs and the
    captions their prompts; tasks with a question: annotations carry question + answer. One
    JSON document, so it is built in memory (a few hundred bytes per item) and sent as one
    chunk. Images get ``width`` / ``height`` from ``size_of(row)`` (default: the metadata's;
    ``store_size(store)`` reads image headers), null when unknown."""
    size_fn = size_of or metadata_size
    spec = tasks.get(job["task"])
    if spec.output == "vector":
        raise InvalidRequest(f"format 'coco' has no place for task {spec.name!r}'s vectors")
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for row in rows:
        inp, out = row.get("input") or {}, row.get("output") or {}
        image_id = int(row["index"])
        if spec.output == "image":
            if not out:
                continue
            w, h = size_fn(row) or (None, None)
            images.append({"id": image_id, "file_name": out.get("url") or out.get("storage_key"),
                           "width": w, "height": h,
                           "seed": (row.get("lineage") or {}).get("seed")})
            annotations.append({"id": image_id, "image_id": image_id,
                                "caption": " ".join(inp.get(t, "") for t in spec.texts)})
            continue
        w, h = size_fn(row) or (None, None)
        images.append({"id": image_id, "file_name": file_name(row), "width": w, "height": h})
        if not out:
            continue
        ann: dict[str, Any] = {"id": image_id, "image_id": image_id}
        if spec.texts:
            ann.update({t: inp.get(t) for t in spec.texts})
            ann[spec.output_column] = out.get("text")
        else:
            ann["caption"] = out.get("text")
        annotations.append(ann)
    info = {"job_id": job.get("id"), "task": job.get("task"), "model": job.get("model"),
            "status": job.get("status"), "created_at": job.get("created_at")}
    doc = {
        "info": {"description": f"Loom job {job.get('id')}", **info},
        "licenses": [],
        "images": images,
        "annotations": annotations,
    }
    yield json.dumps(doc, ensure_ascii=False, default=str).encode()


def stream(
    fmt: str, rows: Iterable[dict[str, Any]], *, job: dict[str, Any], view: str = "full",
    size_of: SizeFn | None = None, images: ImageFn | None = None, drop_images: bool = False,
) -> Iterator[bytes]:
    """The export of ``rows`` (result rows of ``job``, a ``jobs.job_dict``) in ``fmt``
    (jsonl | csv | coco) as byte chunks; ``view`` "table" keeps the user's columns and the
    task's own (``table_record``); ``size_of``: the COCO images' width and height (see
    ``coco_chunks``); ``images``: the stored inputs of a source image column of bytes (the table
    view writes them base64) unless ``drop_images``."""
    if view not in VIEWS:
        raise InvalidRequest(f"view: expected one of {', '.join(VIEWS)}, got {view!r}")
    if not tasks.get(job["task"]).tabular and (fmt == "coco" or view == "table"):
        raise InvalidRequest(f"a {job['task']} job's result is a model version (loom models, GET "
                             "/v1/models); export it as jsonl or csv in the full view")
    if fmt == "coco":
        return coco_chunks(rows, job, size_of)
    if view == "table":
        spec = tasks.get(job["task"])
        described = columns.of_job(job)

        def image(row: dict[str, Any]) -> str | None:
            found = images(row) if images is not None and not drop_images else None
            return base64.b64encode(found[0]).decode() if found else None

        choices = "n" in (job.get("params") or {})
        records = (table_record(r, spec, described, image=image(r), drop_image=drop_images,
                                choices=choices) for r in rows)
        if fmt == "jsonl":
            return jsonl_lines(records)
        if fmt == "csv":
            return csv_lines(records, columns=None)
    elif fmt == "jsonl":
        return jsonl_lines(rows)
    elif fmt == "csv":
        return csv_lines(csv_record(r) for r in rows)
    raise InvalidRequest(f"format: expected one of {', '.join(MEDIA_TYPES)}, got {fmt!r}")


def write(path: Any, fmt: str, rows: Iterable[dict[str, Any]], *, job: dict[str, Any],
          view: str = "full", size_of: SizeFn | None = None, images: ImageFn | None = None,
          drop_images: bool = False) -> None:
    """Stream an export into a file (created with its parents)."""
    from pathlib import Path

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as f:
        for chunk in stream(fmt, rows, job=job, view=view, size_of=size_of, images=images,
                            drop_images=drop_images):
            f.write(chunk)
