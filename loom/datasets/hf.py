"""Hugging Face datasets as inputs: a ``save_to_disk`` folder (read with ``datasets.load_from_disk``:
memory-mapped Arrow, iterated as Arrow batches, so images are never decoded here), or a folder of
its parquet files (the Hub layout ``data/train-00000-of-00001.parquet``, or ``train/*.parquet``),
read with pyarrow. The split is chosen with ``split`` (default: ``train``, or the only one).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loom.datasets.columns import describe
from loom.datasets.items import Columns, batch_items, detect_columns
from loom.errors import InvalidRequest


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    )


def is_parquet_dataset(path: Path) -> bool:
    return path.is_dir() and any(path.rglob("*.parquet"))


def _choose(splits: list[str], split: str | None, where: Path) -> str:
    if split is not None:
        if split not in splits:
            raise InvalidRequest(
                f"{where}: no split {split!r}; the splits are {', '.join(sorted(splits))}")
        return split
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise InvalidRequest(f"{where}: choose a split (--split): {', '.join(sorted(splits))}")


def _image_features(features: Any) -> tuple[str, ...]:
    import datasets

    return tuple(n for n, f in features.items() if isinstance(f, datasets.Image))


def read_saved(
    path: Path, *, split: str | None, batch_size: int, **cols: str | None
) -> Iterator[list[dict[str, Any]]]:
    import datasets

    ds: Any = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[_choose(list(ds.keys()), split, path)]
    elif split is not None and ds.split is not None and str(ds.split) != split:
        raise InvalidRequest(f"{path}: this dataset is the {ds.split!s} split, not {split!r}")
    features = _image_features(ds.features)
    chosen: Columns | None = None
    described: dict[str, Any] | None = None
    for table in ds.with_format("arrow").iter(batch_size=batch_size):
        if chosen is None:
            batch = table.to_batches()[0] if table.num_rows else None
            chosen = detect_columns(table.schema, batch, image_features=features, **cols)
            described = describe(table.schema, chosen, "hf")
        if table.num_rows:
            yield batch_items(table, chosen, path, described)


_SPLIT_FILE = re.compile(r"^(?P<split>[A-Za-z0-9_.]+?)[-_]\d{5}(?:-of-\d{5})?\.parquet$")


def parquet_splits(path: Path) -> dict[str, list[Path]]:
    """split -> files, from file names (``train-00000-of-00003.parquet``) or folder names."""
    splits: dict[str, list[Path]] = {}
    for f in sorted(path.rglob("*.parquet")):
        m = _SPLIT_FILE.match(f.name)
        if m:
            name = m.group("split")
        elif f.parent != path and f.parent.name != "data":
            name = f.parent.name  # train/0000.parquet
        else:
            name = "train"  # a plain folder of parquet files is one split

        splits.setdefault(name, []).append(f)
    return splits


def read_parquet_folder(
    path: Path, *, split: str | None, batch_size: int, **cols: str | None
) -> Iterator[list[dict[str, Any]]]:
    import pyarrow.parquet as pq

    splits = parquet_splits(path)
    if not splits:
        raise InvalidRequest(f"{path}: no .parquet files in this folder")
    files = splits[_choose(list(splits), split, path)]
    chosen: Columns | None = None
    described: dict[str, Any] | None = None
    for f in files:
        with pq.ParquetFile(f) as pf:
            features = _features_from_metadata(pf.schema_arrow.metadata)
            for batch in pf.iter_batches(batch_size=batch_size):
                if chosen is None:
                    chosen = detect_columns(batch.schema, batch, image_features=features, **cols)
                    described = describe(batch.schema, chosen, "hf")
                if batch.num_rows:
                    yield batch_items(batch, chosen, f.parent, described)


def _features_from_metadata(meta: dict[bytes, bytes] | None) -> tuple[str, ...]:
    """Image columns named in the ``huggingface`` schema metadata that ``datasets`` writes."""
    if not meta or b"huggingface" not in meta:
        return ()
    try:
        info = json.loads(meta[b"huggingface"])
        features = info.get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return ()
    return tuple(n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image")
