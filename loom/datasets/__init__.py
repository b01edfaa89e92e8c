"""Dataset-native inputs and outputs, streamed (torch-free; pyarrow etc. come from the
``datasets`` extra and are imported on first use).

Inputs::

    for batch in open_source("urls.parquet", image_col="url", limit=1000):
        ...   # batch: list of item dicts (see loom.datasets.items), at most batch_size long

Outputs (rows are ``loom.exports.result_rows`` dicts)::

    with writer_for("parquet", "out/", task="caption", shard_rows=500_000) as w:
        w.write(rows)
    result = w.result            # rows written, paths of the files

Formats: ``parquet``, ``csv``, ``tsv``, ``jsonl``, ``txt`` (URL list), ``webdataset``, ``hf``
(``save_to_disk`` folder or a folder of its parquet files).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loom.errors import InvalidRequest

INPUT_FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt", "webdataset", "hf")
OUTPUT_FORMATS = ("parquet", "webdataset", "hf")
SUFFIXES = {
    ".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
    ".ndjson": "jsonl", ".txt": "txt", ".tar": "webdataset", ".tgz": "webdataset",
}

__all__ = [
    "INPUT_FORMATS", "OUTPUT_FORMATS", "detect_format", "is_dataset", "open_source",
    "output_format_for", "writer_for", "write_rows", "stream_rows", "store_images",
    "store_vectors",
]


def _is_pattern(path: str) -> bool:
    return "{" in path and ".." in path and "}" in path


def detect_format(path: str | Path) -> str | None:
    """The input format of ``path`` by suffix or folder contents; None if it is no dataset (a
    plain folder of images, a single image)."""
    text = str(path)
    if _is_pattern(text):
        return "webdataset"
    p = Path(text).expanduser()
    if text.endswith(".tar.gz"):
        return "webdataset"
    if p.suffix.lower() in SUFFIXES and not p.is_dir():
        return SUFFIXES[p.suffix.lower()]
    if p.is_dir():
        from loom.datasets import hf

        if hf.is_saved_dataset(p):
            return "hf"
        if any(p.glob("*.tar")):
            return "webdataset"
        if hf.is_parquet_dataset(p):
            return "hf"
    return None


def is_dataset(path: str | Path) -> bool:
    return detect_format(path) is not None


def open_source(
    path: str | Path,
    *,
    format: str | None = None,  # noqa: A002 - the user-facing word
    image_col: str | None = None,
    question_col: str | None = None,
    prompt_col: str | None = None,
    id_col: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    sample: int | None = None,
    seed: int | None = None,
    batch_size: int = 1000,
) -> Iterator[list[dict[str, Any]]]:
    """The items of a dataset, in lists of at most ``batch_size`` (never the whole source).

    ``limit``: the first N items (stops reading there). ``sample``: a uniform random N (one pass
    over the source, memory O(N); ``seed`` makes it repeatable), in source order.
    Raises InvalidRequest for a missing file ("no such file"), an unknown format, an unknown
    column or split (the valid names are listed).
    """
    from loom.datasets import items as it

    text = str(path)
    fmt = format or detect_format(text)
    if fmt is None:
        if not _is_pattern(text) and not Path(text).expanduser().exists():
            raise InvalidRequest(f"no such file: {text}")
        raise InvalidRequest(
            f"{text}: not a dataset (expected {', '.join(INPUT_FORMATS)}; see --format)")
    if fmt not in INPUT_FORMATS:
        raise InvalidRequest(f"unknown format {fmt!r}; use one of {', '.join(INPUT_FORMATS)}")
    if fmt != "webdataset" and not Path(text).expanduser().exists():
        raise InvalidRequest(f"no such file: {text}")
    if limit is not None and limit < 1 or sample is not None and sample < 1:
        raise InvalidRequest("limit and sample must be at least 1")
    cols: dict[str, str | None] = dict(
        image_col=image_col, question_col=question_col, prompt_col=prompt_col, id_col=id_col)
    batches = _open(Path(text).expanduser() if fmt != "webdataset" else text, fmt,
                    split=split, batch_size=batch_size, cols=cols)
    if sample is not None:
        chosen = it.sample_items(batches, sample, seed=seed)
        return it.rebatch(chosen, batch_size)
    if limit is not None:
        return it.limit_batches(batches, limit)
    return batches


def _open(path: Any, fmt: str, *, split: str | None, batch_size: int,
          cols: dict[str, str | None]) -> Iterator[list[dict[str, Any]]]:
    if fmt == "webdataset":
        from loom.datasets import wds

        return wds.read_shards(str(path), batch_size=batch_size, **cols)
    if fmt == "hf":
        from loom.datasets import hf

        if hf.is_saved_dataset(path):
            return hf.read_saved(path, split=split, batch_size=batch_size, **cols)
        return hf.read_parquet_folder(path, split=split, batch_size=batch_size, **cols)
    from loom.datasets import tables

    return tables.read_table(path, fmt, batch_size=batch_size, **cols)


def output_format_for(path: str | Path) -> str | None:
    """``--out x.parquet`` -> parquet, ``x.tar`` -> webdataset; None when the suffix says nothing."""
    suffix = Path(str(path)).suffix.lower()
    return {".parquet": "parquet", ".tar": "webdataset"}.get(suffix)


def writer_for(
    fmt: str,
    out: str | Path,
    *,
    task: str,
    shard_rows: int | None = None,
    images: Any = None,
    row_group_rows: int = 10_000,
    arrow: bool = False,
    vectors: Any = None,
    columns: dict[str, Any] | None = None,
    drop_images: bool = False,
) -> Any:
    """A writer with ``write_row(row)``, ``write(rows)``, ``close() -> WriteResult(rows, paths)``
    (also a context manager). ``images(row) -> (bytes, ext) | None`` supplies the image of a row
    (``store_images(store)``: generated outputs and stored inputs); WebDataset and HF embed it.
    ``columns``: the source dataset's description (loom.datasets.columns): Parquet and HF keep
    its columns first, under their names and types (``drop_images``: without the image column).

    - parquet: ``out`` ending in ``.parquet`` -> that one file; else a folder of
      ``part-00000.parquet`` shards of at most ``shard_rows`` rows (default 1,000,000).
    - webdataset: ``out`` ending in ``.tar`` -> that one tar; else a folder of
      ``shard-00000.tar`` of at most ``shard_rows`` samples (default 10,000).
    - hf: a folder ``out/data/train-00000.parquet`` with an HF ``Image`` column ``image``
      (``load_dataset(out)``); ``arrow=True`` also converts it at close, with ``datasets``,
      into the ``save_to_disk`` layout in ``out`` (``load_from_disk(out)``; costly, see
      parquet_writer.HFRowsWriter).
    """
    from loom.datasets import parquet_writer, writers

    if fmt == "parquet":
        return parquet_writer.ParquetRowsWriter(out, task=task, shard_rows=shard_rows or 1_000_000,
                                         images=images, row_group_rows=row_group_rows,
                                         vectors=vectors, columns=columns,
                                         drop_images=drop_images)
    if fmt == "webdataset":
        return writers.WebDatasetRowsWriter(out, task=task, shard_rows=shard_rows, images=images,
                                            vectors=vectors, columns=columns)
    if fmt == "hf":
        return parquet_writer.HFRowsWriter(out, task=task, shard_rows=shard_rows, images=images,
                                    row_group_rows=row_group_rows, arrow=arrow, vectors=vectors,
                                    columns=columns, drop_images=drop_images)
    raise InvalidRequest(f"unknown output format {fmt!r}; use one of {', '.join(OUTPUT_FORMATS)}")


def write_rows(fmt: str, rows: Any, out: str | Path, *, task: str, **kwargs: Any) -> Any:
    """Write every row; returns the WriteResult."""
    with writer_for(fmt, out, task=task, **kwargs) as w:
        w.write(rows)
    return w.result


def stream_rows(fmt: str, rows: Any, *, task: str, images: Any = None, vectors: Any = None,
                columns: dict[str, Any] | None = None,
                drop_images: bool = False) -> Iterator[bytes]:
    """Parquet (one file) or WebDataset (one tar) as byte chunks, for HTTP responses."""
    from loom.datasets import writers

    return writers.stream_rows(fmt, rows, task=task, images=images, vectors=vectors,
                               columns=columns, drop_images=drop_images)


def store_vectors(store: Any) -> Any:
    """``vectors=`` for the writers: a vector output's stored ``.npy`` (Parquet: a list<float32>
    column ``vector``; WebDataset: the sample's ``{key}.npy``)."""
    from loom.datasets import sinks

    return sinks.store_vectors(store)


def store_images(store: Any, *, inputs: bool = True) -> Any:
    from loom.datasets import sinks

    return sinks.store_images(store, inputs=inputs)
