"""Reading what the user points the CLI at: image files and folders, question rows, prompts,
and the seeds of seeded tasks. Shared by the embedded commands and ``loom submit``."""

from __future__ import annotations

import heapq
import itertools
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loom import tasks
from loom.cli.common import err, fail

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}



def collect_images(paths: list[str]) -> list[tuple[Path, str]]:
    """(file, display name) for files and (recursively) directories. A file named explicitly is
    taken whatever its suffix (a bad one fails its own item); a directory contributes the files
    with image suffixes, named relative to that directory."""
    found: list[tuple[Path, str]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    found.append((f, f.relative_to(p).as_posix()))
        elif p.is_file():
            found.append((p, raw))
        else:
            raise fail(f"no such file or directory: {raw}")
    if not found:
        raise fail("no images found in " + ", ".join(paths))
    return found


def read_questions(path: Path, fields: tuple[str, ...] = ("question",)) -> list[dict[str, Any]]:
    """Rows ``{"file", <fields>..., ...}``; ``file`` relative to the cwd or the JSONL's folder."""
    rows: list[dict[str, Any]] = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise fail(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not row.get("file") or not all(row.get(f) for f in fields):
            raise fail(f"{path}:{n}: expected an object with 'file' and "
                       + " and ".join(repr(f) for f in fields))
        rows.append(row)
    if not rows:
        raise fail(f"{path}: no rows")
    return rows


def resolve_file(name: str, base: Path) -> Path:
    p = Path(name)
    if p.is_absolute() or p.exists():
        return p
    return base / p


def read_prompts(prompt: str | None, prompts_file: Path | None) -> list[str]:
    if prompt and prompts_file:
        raise fail("give a PROMPT or --prompts FILE, not both")
    if prompts_file:
        try:
            prompts = [ln.strip() for ln in prompts_file.read_text().splitlines() if ln.strip()]
        except OSError as exc:
            raise fail(f"cannot read {prompts_file}: {exc.strerror}") from None
    elif prompt:
        prompts = [prompt]
    else:
        raise fail("give a PROMPT or --prompts FILE")
    if not prompts:
        raise fail(f"{prompts_file}: no prompts")
    return prompts


def choose_seed(seed: int | None) -> int:
    """The base seed of a seeded run: the user's, else a random one that is printed."""
    if seed is None:
        seed = tasks.item_seed(given=None, base=None, index=0)
        err.print(f"seed: {seed} (pass --seed {seed} to reproduce)")
    return seed


def text_rows(spec: tasks.TaskSpec, text: str | None, texts_file: Path | None,
              opts: DatasetOpts) -> Iterator[tuple[str, dict[str, Any]]]:
    """(text, metadata) of a text-only task's items: a dataset's text column streamed (its
    other columns as metadata), or a TEXT / a file of lines. Fails here when there are none."""
    field = spec.texts[0]
    if texts_file is not None and is_dataset(str(texts_file), texts_only=True):
        rows = limit_sources(dataset_sources(str(texts_file), spec, opts), opts)
        return ((r.input.get(field, ""), r.metadata) for r in rows)
    return ((line, {}) for line in read_prompts(text, texts_file))


def text_items(spec: tasks.TaskSpec, rows: Iterable[tuple[str, dict[str, Any]]], seed: int,
               variants: int) -> Iterator[dict[str, Any]]:
    """Items {"input", "metadata"}: each text ``variants`` times, item i seeded base + i when
    the task is seeded (``loom.tasks.item_seed``), streamed."""
    field, i = spec.texts[0], 0
    for text, meta in rows:
        for _ in range(variants):
            inp: dict[str, Any] = {field: text}
            if spec.seeded:
                inp["seed"] = tasks.item_seed(given=None, base=seed, index=i)
            yield {"input": inp, "metadata": meta or None}
            i += 1


# --- datasets: tables, WebDataset shards, Hugging Face datasets ----------------------------------


@dataclass
class Source:
    """One item as the CLI read it: its input fields and metadata, and where its image is (a
    local file, or bytes from a table or a shard), if it has one."""

    input: dict[str, Any]
    metadata: dict[str, Any]
    path: Path | None = None
    data: bytes | None = None
    uri: str | None = None  # s3://bucket/key, read when the item is stored or uploaded
    # The dataset's description (loom.datasets.columns), recorded with the job so that its
    # results keep the user's columns; None for files and folders.
    columns: dict[str, Any] | None = None


@dataclass
class DatasetOpts:
    """How to read a dataset source (the --*-col, --split, --limit and --sample options)."""

    image_col: str | None = None
    text_cols: dict[str, str | None] = field(default_factory=dict)  # task text -> column
    id_col: str | None = None
    split: str | None = None
    limit: int | None = None
    sample: int | None = None


def is_dataset(path: str, *, texts_only: bool = False) -> bool:
    """A table, shards or an HF dataset (not an image, a folder of images, or, for tasks that
    take only text, a plain .txt of lines)."""
    from loom import datasets

    fmt = datasets.detect_format(path)
    return fmt is not None and not (texts_only and fmt == "txt")


def dataset_sources(path: str, spec: tasks.TaskSpec, opts: DatasetOpts) -> Iterator[Source]:
    """The items of a dataset, read in streaming batches; every column travels as metadata
    under its own name (loom.datasets.items), the source's description with each."""
    from loom import datasets
    from loom.errors import LoomError

    try:
        batches = datasets.open_source(
            path, image_col=opts.image_col, id_col=opts.id_col, split=opts.split,
            limit=opts.limit, sample=opts.sample,
            question_col=opts.text_cols.get("question"), prompt_col=opts.text_cols.get("prompt"))
        for batch in batches:
            for it in batch:
                src = Source({t: it[t] for t in spec.texts if it.get(t) is not None},
                             dict(it.get("metadata") or {}), columns=it.get("columns"))
                if spec.image:
                    if it.get("image_url"):
                        src.input["image_url"] = it["image_url"]
                    elif it.get("image_bytes") is not None:
                        src.data = bytes(it["image_bytes"])
                    elif str(it.get("image_path") or "").lower().startswith("s3://"):
                        src.uri = str(it["image_path"])
                    elif it.get("image_path"):
                        src.path = Path(str(it["image_path"]))
                yield src
    except LoomError as exc:
        raise fail(exc.message) from None


def image_sources(paths: list[str], spec: tasks.TaskSpec, opts: DatasetOpts) -> Iterator[Source]:
    """Files, folders (recursive) and datasets, in the order given, limited or sampled; read
    as a stream (a million-row table is never held whole). Every path is checked up front, so
    a missing one fails before any work is recorded."""
    kinds = [(raw, is_dataset(raw)) for raw in paths]
    for raw, dataset in kinds:
        if not dataset and not Path(raw).exists():
            raise fail(f"no such file or directory: {raw}")

    def read() -> Iterator[Source]:
        for raw, dataset in kinds:
            if dataset:
                yield from dataset_sources(raw, spec, opts)
            else:
                yield from (Source({}, {"file": name}, path=p) for p, name in collect_images([raw]))

    return limit_sources(read(), opts)


def limit_sources(sources: Iterable[Source], opts: DatasetOpts) -> Iterator[Source]:
    """The first ``limit``, then a uniform random ``sample`` of those (reservoir sampling, in
    the original order: memory is the sample's, not the source's). Fails here, before any
    work is recorded, when nothing is left."""
    it: Iterator[Source] = iter(sources)
    if opts.limit is not None:
        it = itertools.islice(it, opts.limit)
    if opts.sample is not None:
        rng = random.Random()
        keyed = ((rng.random(), i, s) for i, s in enumerate(it))
        it = iter([s for _, _, s in sorted(heapq.nlargest(opts.sample, keyed),
                                           key=lambda t: t[1])])
    first = next(it, None)
    if first is None:
        raise fail("no items to run")
    return itertools.chain([first], it)


def count_items(paths: list[str], spec: tasks.TaskSpec, opts: DatasetOpts) -> int:
    """How many items the sources hold in full (for the estimate after a preview)."""
    full = DatasetOpts(opts.image_col, opts.text_cols, opts.id_col, opts.split)
    return sum(sum(1 for _ in dataset_sources(p, spec, full)) if is_dataset(p)
               else len(collect_images([p])) for p in paths)


def labelled_rows(table: str, *, image_col: str | None, caption_col: str | None,
                  question_col: str | None, answer_col: str | None,
                  split: str | None = None) -> Iterator[tuple[dict[str, str], Path | bytes | str]]:
    """A labelled table for fine-tuning: (labels {caption?, question?, answer?}, its image: a
    file, bytes or an s3:// path), read in streaming batches. A row with no image, or with no
    caption and no question + answer, is an error naming it."""
    from loom import datasets
    from loom.errors import LoomError

    n = 0
    try:
        for batch in datasets.open_source(table, image_col=image_col, question_col=question_col,
                                          split=split):
            for it in batch:
                n += 1
                meta = dict(it.get("metadata") or {})
                raw = {"caption": meta.get(caption_col) if caption_col else None,
                       "question": it.get("question"),
                       "answer": meta.get(answer_col) if answer_col else None}
                labels = {k: str(v) for k, v in raw.items() if v not in (None, "")}
                if "caption" not in labels and not ("question" in labels and "answer" in labels):
                    raise fail(f"{table}: row {n} has no caption and no question with an answer "
                               f"(columns: --caption-col {caption_col}, --question-col "
                               f"{question_col}, --answer-col {answer_col})")
                image: Path | bytes | str
                if it.get("image_bytes") is not None:
                    image = bytes(it["image_bytes"])
                elif it.get("image_path"):
                    path = str(it["image_path"])
                    image = path if path.lower().startswith("s3://") else Path(path)
                else:
                    raise fail(f"{table}: row {n} has no image file or bytes (image URLs are "
                               "not read for fine-tuning)")
                yield labels, image
    except LoomError as exc:
        raise fail(exc.message) from None
