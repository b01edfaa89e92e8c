"""A job's results in any format, written by one function for every caller: ``loom results``,
the embedded commands' ``--out`` and ``GET /v1/jobs/{id}/results``.

JSON lines, CSV and COCO come from ``loom.exports`` (the ``full`` view: every field with lineage;
``table``: the task's own columns); Parquet, WebDataset and Hugging Face dataset folders from
``loom.datasets`` (every column, with the images and vectors read from the store). ``rows`` are
result rows (``loom.exports.result_rows``); ``job`` is the job as ``loom.jobs.job_dict`` shows it.

A job submitted from a dataset keeps the user's columns (loom.datasets.columns): the table
formats (Parquet, HF, and the table view of JSONL and CSV) write every input column under its own
name and type first, one row per input row in input order (a failed row too, with ``status``,
``error_code`` and ``error_message``), then Loom's columns, prefixed ``loom_`` on a collision.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from loom import datasets, exports
from loom.datasets import columns
from loom.errors import InvalidRequest

TEXT_FORMATS = ("jsonl", "csv", "coco")
FORMATS = (*TEXT_FORMATS, *datasets.OUTPUT_FORMATS)
STREAMED = (*TEXT_FORMATS, "parquet", "webdataset")  # hf is a folder: written, never streamed


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InvalidRequest(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def stream(fmt: str, rows: Iterable[dict[str, Any]], *, job: dict[str, Any], store: Any,
           view: str = "full", drop_images: bool = False) -> Iterator[bytes]:
    """The results in ``fmt`` as byte chunks (an HTTP response, stdout). ``drop_images``:
    leave the source dataset's image column out of the table formats."""
    check_format(fmt)
    if fmt in datasets.OUTPUT_FORMATS:
        if fmt not in STREAMED:
            raise InvalidRequest(f"format: {fmt} is a folder; it is written, not streamed "
                                 "(use parquet: datasets.load_dataset('parquet', ...) opens it)")
        return datasets.stream_rows(fmt, rows, task=job["task"],
                                    images=datasets.store_images(store),
                                    vectors=datasets.store_vectors(store),
                                    columns=columns.of_job(job), drop_images=drop_images)
    return exports.stream(fmt, rows, job=job, view=view,
                          size_of=exports.store_size(store) if fmt == "coco" else None,
                          images=_table_images(store, job, drop_images), drop_images=drop_images)


def write(fmt: str, rows: Iterable[dict[str, Any]], out: str | Path, *, job: dict[str, Any],
          store: Any, view: str = "full", drop_images: bool = False) -> int | None:
    """Write the results in ``fmt`` to ``out`` (a file; a folder for sharded or hf output).
    Returns the number of rows for the dataset formats (None: not counted)."""
    check_format(fmt)
    if fmt in datasets.OUTPUT_FORMATS:
        written = datasets.write_rows(fmt, rows, out, task=job["task"],
                                      images=datasets.store_images(store),
                                      vectors=datasets.store_vectors(store),
                                      columns=columns.of_job(job), drop_images=drop_images)
        return int(written.rows)
    exports.write(out, fmt, rows, job=job, view=view,
                  size_of=exports.store_size(store) if fmt == "coco" else None,
                  images=_table_images(store, job, drop_images), drop_images=drop_images)
    return None


def _table_images(store: Any, job: dict[str, Any], drop_images: bool) -> Any:
    """For the table view of JSONL/CSV: the stored input bytes of a source image column of
    bytes (written base64), unless dropped."""
    described = columns.of_job(job)
    if drop_images or not (described and described.get("image_bytes")):
        return None
    return datasets.store_images(store)
