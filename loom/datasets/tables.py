"""Tables read in streaming batches with pyarrow: Parquet (a file or a folder of files), CSV/TSV,
JSONL, and plain URL lists (.txt). Never read whole: memory is a few batches.

CSV/TSV columns are read as text (a later block can never fail on a type guessed from the first).
Relative image paths are resolved against the table's folder.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loom.datasets.columns import describe
from loom.datasets.items import Columns, batch_items, detect_columns
from loom.errors import InvalidRequest

if TYPE_CHECKING:
    import pyarrow as pa

BLOCK_BYTES = 8 * 1024 * 1024


def _arrow_batches(path: Path, fmt: str, batch_size: int) -> Iterator[pa.RecordBatch]:
    import pyarrow as pa

    if fmt == "parquet":
        if path.is_dir():
            import pyarrow.dataset as ds

            files = sorted(str(p) for p in path.rglob("*.parquet"))
            if not files:
                raise InvalidRequest(f"{path}: no .parquet files in this folder")
            yield from ds.dataset(files, format="parquet").to_batches(batch_size=batch_size)
            return
        import pyarrow.parquet as pq

        with pq.ParquetFile(path) as f:
            yield from f.iter_batches(batch_size=batch_size)
        return
    if fmt in ("csv", "tsv"):
        import pyarrow.csv as pcsv

        delimiter = "\t" if fmt == "tsv" else ","
        with path.open(newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
        if not header:
            return
        reader = pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(block_size=BLOCK_BYTES),
            parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(
                column_types={name: pa.string() for name in header},
                strings_can_be_null=True,
            ),
        )
        yield from _rechunk(reader, batch_size)
        return
    if fmt == "jsonl":
        import pyarrow.json as pjson

        if path.stat().st_size == 0:
            return
        reader = pjson.open_json(path, read_options=pjson.ReadOptions(block_size=BLOCK_BYTES))
        yield from _rechunk(reader, batch_size)
        return
    raise InvalidRequest(f"unknown table format {fmt!r}")


def _rechunk(reader: Any, batch_size: int) -> Iterator[pa.RecordBatch]:
    """Blocks of a streaming reader cut to at most ``batch_size`` rows (zero-copy slices)."""
    for block in reader:
        for start in range(0, block.num_rows, batch_size):
            yield block.slice(start, batch_size)


def read_table(
    path: Path,
    fmt: str,
    *,
    batch_size: int = 1000,
    image_col: str | None = None,
    question_col: str | None = None,
    prompt_col: str | None = None,
    id_col: str | None = None,
    image_features: tuple[str, ...] = (),
) -> Iterator[list[dict[str, Any]]]:
    """Items of a Parquet/CSV/TSV/JSONL table in lists of at most ``batch_size``."""
    base_dir = path if path.is_dir() else path.parent
    if fmt == "txt":
        yield from _read_url_list(path, batch_size)
        return
    cols: Columns | None = None
    described: dict[str, Any] | None = None
    for batch in _arrow_batches(path, fmt, batch_size):
        if cols is None:
            cols = detect_columns(
                batch.schema, batch, image_col=image_col, question_col=question_col,
                prompt_col=prompt_col, id_col=id_col, image_features=image_features,
            )
            described = describe(batch.schema, cols, fmt)
        if batch.num_rows:
            yield batch_items(batch, cols, base_dir, described)


def _read_url_list(path: Path, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """One image URL (or path) per line, as img2dataset's txt input."""
    from loom.datasets.items import image_field

    batch: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            batch.append({"id": None, **image_field(line, path.parent), "metadata": {}})
            if len(batch) >= batch_size:
                yield batch
                batch = []
    if batch:
        yield batch
