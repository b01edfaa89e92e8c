"""Results as JSONL, CSV or COCO, streamed: rows are read from the database in pages.

A *result row* (what ``result_rows`` yields and the JSONL export writes) is one item:
``{"index", "item_id", "status", "metadata", "input", "output": {"id", "kind", "text",
"storage_key", "url", "content_type", "sha256", "size_bytes"} | None, "error": {"code",
"message"} | None, "lineage": {"model", "model_version", "weights_sha256", "seed", "attempt",
"worker_id"} | None}``. ``with_url`` fills ``output.url`` (presigned or API content URL).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from sqlalchemy.orm import Session

from loom.models import Item, Job, Output

PAGE = 1000
MEDIA_TYPES: dict[str, tuple[str, str]] = {
    "jsonl": ("application/x-ndjson", "jsonl"),
    "csv": ("text/csv", "csv"),
    "coco": ("application/json", "json"),
}
CSV_COLUMNS = (
    "index", "item_id", "status", "file", "image", "question", "prompt", "seed", "text",
    "output_url", "error_code", "error_message", "model", "model_version",
)


def job_info(job: Job) -> dict[str, Any]:
    return {
        "job_id": job.id, "task": job.task, "model": job.model_name, "status": job.status,
        "created_at": job.created_at.isoformat() if job.created_at else None,
    }


def _row(item: Item, output: Output | None) -> dict[str, Any]:
    out = lineage = None
    if output is not None:
        out = {
            "id": output.id, "kind": output.kind, "text": output.text,
            "storage_key": output.storage_key, "url": None,
            "content_type": output.content_type, "sha256": output.sha256,
            "size_bytes": output.size_bytes,
        }
        lineage = {
            "model": output.model_name, "model_version": output.model_version,
            "weights_sha256": output.weights_sha256, "seed": output.seed,
            "attempt": output.attempt, "worker_id": output.worker_id,
            "input_sha256": output.input_sha256,
        }
    error = {"code": item.error_code, "message": item.error_message} if item.error_code else None
    return {
        "index": item.index, "item_id": item.id, "status": item.status,
        "metadata": item.item_metadata, "input": item.input or {}, "output": out,
        "error": error, "lineage": lineage,
    }


def result_rows(
    session: Session, *, job_id: str, tenant_id: str | None = None, page: int = PAGE
) -> Iterator[dict[str, Any]]:
    """Every item of the job in index order with its output (``loom.jobs.iter_results``, which
    reads one page at a time). Raises NotFound for another tenant's job."""
    from loom import jobs

    for item, output in jobs.iter_results(
        session, job_id=job_id, tenant_id=tenant_id, page_size=page
    ):
        yield _row(item, output)


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


def jsonl_lines(rows: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    for row in rows:
        yield (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode()


def csv_record(row: dict[str, Any]) -> dict[str, Any]:
    inp, out = row.get("input") or {}, row.get("output") or {}
    err, lin = row.get("error") or {}, row.get("lineage") or {}
    return {
        "index": row.get("index"), "item_id": row.get("item_id"), "status": row.get("status"),
        "file": (row.get("metadata") or {}).get("file"),
        "image": inp.get("image_url") or inp.get("image_key"),
        "question": inp.get("question"), "prompt": inp.get("prompt"),
        "seed": lin.get("seed", inp.get("seed")), "text": out.get("text"),
        "output_url": out.get("url"), "error_code": err.get("code"),
        "error_message": err.get("message"), "model": lin.get("model"),
        "model_version": lin.get("model_version"),
    }


def csv_lines(
    records: Iterable[dict[str, Any]], columns: Iterable[str] = CSV_COLUMNS
) -> Iterator[bytes]:
    """CSV of flat records (header first); values None become empty cells."""
    cols = list(columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({k: ("" if rec.get(k) is None else rec.get(k)) for k in cols})
        if buf.tell() > 64 * 1024:
            yield buf.getvalue().encode()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue().encode()


def coco_chunks(rows: Iterable[dict[str, Any]], job: dict[str, Any]) -> Iterator[bytes]:
    """A COCO captions document. VQA: annotations carry question + answer; generate: the images
    are the outputs and the captions their prompts. One JSON document, so it is built in memory
    (a few hundred bytes per item) and sent as one chunk."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    task = job.get("task")
    for row in rows:
        inp, out = row.get("input") or {}, row.get("output") or {}
        image_id = int(row["index"])
        if task == "generate":
            if not out:
                continue
            images.append({"id": image_id, "file_name": out.get("url") or out.get("storage_key"),
                           "seed": (row.get("lineage") or {}).get("seed")})
            annotations.append({"id": image_id, "image_id": image_id, "caption": inp.get("prompt")})
            continue
        images.append({"id": image_id, "file_name": file_name(row)})
        if not out:
            continue
        ann: dict[str, Any] = {"id": image_id, "image_id": image_id}
        if task == "vqa":
            ann.update(question=inp.get("question"), answer=out.get("text"))
        else:
            ann["caption"] = out.get("text")
        annotations.append(ann)
    doc = {
        "info": {"description": f"Loom job {job.get('job_id')}", **job},
        "licenses": [],
        "images": images,
        "annotations": annotations,
    }
    yield json.dumps(doc, ensure_ascii=False, default=str).encode()


def stream(fmt: str, rows: Iterable[dict[str, Any]], *, job: dict[str, Any]) -> Iterator[bytes]:
    """The export of ``rows`` in ``fmt`` (jsonl | csv | coco) as byte chunks."""
    if fmt == "jsonl":
        return jsonl_lines(rows)
    if fmt == "csv":
        return csv_lines(csv_record(r) for r in rows)
    if fmt == "coco":
        return coco_chunks(rows, job)
    raise ValueError(f"unknown format {fmt!r}")
