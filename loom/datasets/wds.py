"""WebDataset tar shards, read and written with the standard library's ``tarfile`` (streamed).

The ``webdataset`` package itself imports torch, which ``loom/`` must never load; the format is
plain tar with WebDataset's conventions, which is what both sides here follow:
a sample is the run of consecutive members sharing a *key* (the member path up to the first dot
of its file name); the part after that dot is the field (``jpg``, ``txt``, ``json``, ...).
"""

from __future__ import annotations

import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from loom.datasets.columns import describe_fields
from loom.errors import InvalidRequest

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "image", "img")
TEXT_FIELDS = ("txt", "text", "cls", "caption", "question", "prompt", "id")


def expand_shards(spec: str) -> list[Path]:
    """``shards/{00000..00099}.tar`` (braceexpand), a folder of .tar files, or one file."""
    from braceexpand import braceexpand

    paths: list[Path] = []
    for pattern in braceexpand(spec):
        p = Path(pattern).expanduser()
        if p.is_dir():
            paths.extend(sorted(p.glob("*.tar")))
        else:
            paths.append(p)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise InvalidRequest(f"no such file: {missing[0]}" + (
            f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if not paths:
        raise InvalidRequest(f"{spec}: no .tar shards")
    return paths


def _split_key(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, field.lower() if dot else ""


def _samples(path: Path) -> Iterator[dict[str, bytes]]:
    """Samples of one shard in order: {"__key__": key, field: bytes, ...}. Streamed (``r|*``)."""
    current: dict[str, Any] | None = None
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, field = _split_key(member.name)
            if key.rpartition("/")[2].startswith(".") or not field:
                continue  # hidden files and members without a field are not samples
            f = tar.extractfile(member)
            data = f.read() if f is not None else b""
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[field] = data
    if current is not None:
        yield current


def _decode(field: str, data: bytes) -> Any:
    last = field.rsplit(".", 1)[-1]
    if last == "json":
        try:
            return json.loads(data)
        except ValueError:
            return data.decode("utf-8", errors="replace")
    if last in TEXT_FIELDS or last in ("csv", "tsv", "md"):
        return data.decode("utf-8", errors="replace")
    return None  # other binary members: not metadata


def _lookup(sample: dict[str, Any], decoded: dict[str, Any], name: str | None) -> Any:
    """A field by extension, or a key of the sample's json member."""
    if name is None:
        return None
    if name in decoded:
        return decoded[name]
    js = decoded.get("json")
    if isinstance(js, dict) and name in js:
        return js[name]
    return None


def read_shards(
    spec: str,
    *,
    batch_size: int = 1000,
    image_col: str | None = None,
    question_col: str | None = None,
    prompt_col: str | None = None,
    id_col: str | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Items of WebDataset shards. The key is the item id (unless ``id_col`` names another field);
    the image is the member named by ``image_col`` (an extension) or the first image member;
    ``question_col`` / ``prompt_col`` name a text member or a key of the json member; every other
    text/json member travels as metadata under its extension, plus ``__key__`` and
    ``__shard__``."""
    batch: list[dict[str, Any]] = []
    described: dict[str, Any] | None = None
    for shard in expand_shards(spec):
        for sample in _samples(shard):
            key = sample.pop("__key__")
            image = image_col if image_col is not None else next(
                (f for f in sample if f.rsplit(".", 1)[-1] in IMAGE_FIELDS), None)
            if image_col is not None and image_col not in sample:
                raise InvalidRequest(
                    f"{shard}: sample {key!r} has no {image_col!r} member "
                    f"(it has {', '.join(sorted(sample))})"
                )
            decoded = {f: _decode(f, d) for f, d in sample.items() if f != image}
            item: dict[str, Any] = {"id": key}
            if id_col is not None and _lookup(sample, decoded, id_col) is not None:
                item["id"] = str(_lookup(sample, decoded, id_col))
            if image is not None and sample.get(image):
                item["image_bytes"] = sample[image]
            question = _lookup(sample, decoded, question_col or "question")
            prompt = _lookup(sample, decoded, prompt_col or "prompt")
            if question is not None:
                item["question"] = str(question)
            if prompt is not None:
                item["prompt"] = str(prompt)
            if described is None:  # the first sample's members are the source's columns
                described = describe_fields(
                    ["__key__", *sample], fmt="webdataset", image=image,
                    id_=id_col or "__key__", question=question_col, prompt=prompt_col)
            meta = {"__key__": key, **{f: v for f, v in decoded.items() if v is not None}}
            meta["__shard__"] = shard.name
            item["metadata"] = meta
            item["columns"] = described
            batch.append(item)
            if len(batch) >= batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def member_bytes(name: str, data: bytes, mtime: int) -> bytes:
    """One regular-file tar member (header + data + padding). The ustar header is packed here
    because ``tarfile.TarInfo.tobuf`` costs ~150 us a member (a million samples = 3 million
    members); names that ustar cannot hold go through tarfile (GNU long names)."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or not name.isascii():
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), mtime, 0o644
        header = info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")
    else:
        fields = (
            raw.ljust(100, b"\0"), b"0000644\0", b"0000000\0", b"0000000\0",
            b"%011o\0" % len(data), b"%011o\0" % mtime, b" " * 8, b"0", b"\0" * 100,
            b"ustar\x0000", b"\0" * 32, b"\0" * 32, b"0000000\0", b"0000000\0", b"\0" * 155,
        )
        header = b"".join(fields).ljust(512, b"\0")
        chksum = b"%06o\0 " % sum(header)
        header = header[:148] + chksum + header[156:]
    pad = -len(data) % 512
    return header + data + b"\0" * pad


def sample_bytes(key: str, fields: dict[str, bytes], mtime: int) -> bytes:
    return b"".join(member_bytes(f"{key}.{field}", data, mtime) for field, data in fields.items())


class ShardWriter:
    """Tar shards of at most ``shard_rows`` samples, written as they come (``{prefix}-{n:05d}.tar``
    in ``out_dir``). ``add(key, {field: bytes})`` appends one sample."""

    def __init__(self, out_dir: str | Path, *, shard_rows: int = 10_000,
                 prefix: str = "shard") -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_rows = shard_rows
        self.prefix = prefix
        self.paths: list[Path] = []
        self.rows = 0
        self._file: BinaryIO | None = None
        self._in_shard = 0
        self._mtime = int(time.time())

    def _open(self) -> BinaryIO:
        if self._file is None or self._in_shard >= self.shard_rows:
            self._close_shard()
            path = self.out_dir / f"{self.prefix}-{len(self.paths):05d}.tar"
            self.paths.append(path)
            self._file = path.open("wb", buffering=1024 * 1024)
            self._in_shard = 0
        return self._file

    def add(self, key: str, fields: dict[str, bytes]) -> None:
        f = self._open()
        f.write(sample_bytes(key, fields, self._mtime))
        self._in_shard += 1
        self.rows += 1

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.write(b"\0" * 1024)  # end-of-archive: two zero blocks
            self._file.close()
            self._file = None

    def close(self) -> list[Path]:
        self._close_shard()
        return self.paths
