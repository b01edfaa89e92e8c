"""Writers of result rows: WebDataset shards (or one tar as a byte stream) here, Parquet and
Hugging Face folders in ``parquet_writer``; ``stream_rows`` streams either for HTTP responses.
All take rows one at a time, so a million-row export keeps memory flat.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from loom.datasets import records
from loom.datasets.parquet_writer import ParquetRowsWriter
from loom.datasets.sinks import ImageFn, Sink, VectorFn, WriteResult
from loom.datasets.wds import ShardWriter, sample_bytes


class WebDatasetRowsWriter:
    """Samples ``{key}.{png|jpg|...}`` (the generated image, or the stored input image),
    ``{key}.txt`` (caption / answer; a generated image's prompt) and ``{key}.json`` (the row:
    metadata + provenance). ``out`` is a folder of shards, a ``.tar`` file, or None for one
    streamed tar (``sink``)."""

    def __init__(self, out: str | Path | None, *, task: str, shard_rows: int | None = None,
                 images: ImageFn | None = None, vectors: VectorFn | None = None,
                 columns: dict[str, Any] | None = None) -> None:
        self.task = task
        self.id_col = (columns or {}).get("id")  # the json member's "id": the user's id
        self.images = images
        self.vectors = vectors  # a vector output becomes the sample's {key}.npy
        self.result = WriteResult()
        self.sink: Sink | None = None
        self._file: Any = None
        self._shards: ShardWriter | None = None
        self._mtime = int(time.time())
        if out is None:
            self.sink = self._file = Sink()
        elif str(out).endswith(".tar"):  # one tar file
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            self._file = Path(out).open("wb", buffering=1024 * 1024)
            self.result.paths.append(Path(out))
        else:
            self._shards = ShardWriter(out, shard_rows=shard_rows or 10_000)

    def write_row(self, row: dict[str, Any]) -> None:
        fields: dict[str, bytes] = {}
        img = self.images(row) if self.images else None
        if img is not None:
            fields[img[1]] = img[0]
        vec = self.vectors(row) if self.vectors else None
        if vec is not None:
            fields["npy"] = vec
        out = row.get("output") or {}
        text = out.get("text")
        if text is None and self.task == "generate":
            text = (row.get("input") or {}).get("prompt")
        if text is not None:
            fields["txt"] = str(text).encode()
        fields["json"] = json.dumps(
            records.sample_json(row, self.task, self.id_col), ensure_ascii=False, default=str
        ).encode()
        key = records.sample_key(row)
        if self._shards is not None:
            self._shards.add(key, fields)
        else:
            self._file.write(sample_bytes(key, fields, self._mtime))
        self.result.rows += 1

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.write_row(row)

    def close(self) -> WriteResult:
        if self._shards is not None:
            self.result.paths = self._shards.close()
        elif self._file is not None:
            self._file.write(b"\0" * 1024)  # end-of-archive
            if self._file is not self.sink:
                self._file.close()
            self._file = None
        return self.result

    def __enter__(self) -> WebDatasetRowsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stream_rows(
    fmt: str, rows: Iterable[dict[str, Any]], *, task: str, images: ImageFn | None = None,
    row_group_rows: int = 10_000, vectors: VectorFn | None = None,
    columns: dict[str, Any] | None = None, drop_images: bool = False,
) -> Iterator[bytes]:
    """``parquet`` (one file) or ``webdataset`` (one tar) as byte chunks, for HTTP responses:
    a Parquet chunk per row group, a tar chunk per ~1 MiB of samples."""
    if fmt == "parquet":
        pw = ParquetRowsWriter(None, task=task, row_group_rows=row_group_rows, images=images,
                               vectors=vectors, columns=columns, drop_images=drop_images)
        assert pw.sink is not None
        for row in rows:
            pw.write_row(row)
            if not pw._buf:  # a row group was just written
                yield pw.sink.drain()
        pw.close()
        yield pw.sink.drain()
        return
    if fmt == "webdataset":
        ww = WebDatasetRowsWriter(None, task=task, images=images, vectors=vectors,
                                  columns=columns)
        assert ww.sink is not None
        for row in rows:
            ww.write_row(row)
            if ww.sink.tell() and len(ww.sink._buf) >= 1024 * 1024:
                yield ww.sink.drain()
        ww.close()
        yield ww.sink.drain()
        return
    raise ValueError(f"cannot stream format {fmt!r} (parquet | webdataset)")
