"""``loom submit <task command> ...``: remote submission through ``loom.client``, one command
per task in the registry. A task's inputs decide the command's shape: images only (``caption``),
images with text (``ask IMAGE QUESTION`` or ``--questions F.jsonl``), or text only and seeded
(``generate PROMPT`` or ``--prompts F.txt``, ``--seed``, ``--variants``)."""

# No postponed annotations: the command builders put closure values (a task's field names)
# into the Typer annotations, which must be evaluated where they are written.

import itertools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from loom import tasks
from loom.cli.common import ApiOpt, KeyOpt, console, fail, follow, print_job, remote
from loom.cli.inputs import (
    DatasetOpts,
    Source,
    choose_seed,
    dataset_sources,
    image_sources,
    is_dataset,
    limit_sources,
    read_questions,
    resolve_file,
    text_items,
    text_rows,
)

Wait = Annotated[bool, typer.Option("--wait", help="Follow progress until the job finishes.")]
Model = Annotated[str | None, typer.Option(help="Model name (default: the server's).")]
Priority = Annotated[int, typer.Option(min=0, max=9, help="0 (default) .. 9 (most urgent).")]
Idem = Annotated[str | None, typer.Option("--idempotency-key", help="Retry-safe submission key.")]


INLINE_ITEMS = 100  # at most this many items without local images go in the request itself


def _items(sources: Iterable[Source]) -> Iterator[dict[str, Any]]:
    """Items for ``Client.submit_dataset``: local images as ``image_path``/``image_bytes``."""
    for src in sources:
        item: dict[str, Any] = {**src.input, "metadata": src.metadata or None}
        if src.data is not None:
            item["image_bytes"] = src.data
        elif src.uri is not None:
            item["image_path"] = src.uri  # read by submit_dataset, uploaded like a file
        elif src.path is not None:
            item["image_path"] = str(src.path)
        yield item


def _submit(c: Any, spec: tasks.TaskSpec, items: Iterable[dict[str, Any]],
            opts: dict[str, Any]) -> dict[str, Any]:
    """A few items without local images go inline; anything else is uploaded in bounded
    requests (one per image, then the manifest, streamed) and becomes one job."""
    source = iter(items)
    head = list(itertools.islice(source, INLINE_ITEMS + 1))
    local = any("image_path" in i or "image_bytes" in i for i in head)  # or s3:// ones
    if not local and len(head) <= INLINE_ITEMS:
        return c.submit(spec.name, head, **opts)  # type: ignore[no-any-return]
    from loom.config import Settings

    return c.submit_dataset(  # type: ignore[no-any-return]
        spec.name, itertools.chain(head, source),
        s3_endpoint_url=Settings().s3_endpoint_url, **opts)


def _need_api(api: str | None) -> str:
    if not api:
        raise fail("remote submission needs --api URL (or LOOM_API_URL)")
    return api


def _send(api: str | None, api_key: str | None, wait: bool,
          submit: Callable[[Any], dict[str, Any]]) -> None:
    def run(c: Any) -> None:
        job = submit(c)
        console.print(f"submitted job [bold]{job['id']}[/bold] ({job['item_count']} items)")
        if wait:
            print_job(follow(c.status, job["id"], 1.0))

    remote(run, _need_api(api), api_key)


Cache = Annotated[bool, typer.Option("--cache/--no-cache", help="Reuse earlier outputs.")]
ImageCol = Annotated[str | None, typer.Option(help="Datasets: the image column.")]
IdCol = Annotated[str | None, typer.Option(help="Datasets: the id column.")]
Split = Annotated[str | None, typer.Option(help="Hugging Face datasets: the split.")]
Limit = Annotated[int | None, typer.Option(min=1, help="Only the first N items.")]
Sample = Annotated[int | None, typer.Option(min=1, help="A random N items.")]


def image_command(spec: tasks.TaskSpec) -> Callable[..., None]:
    def command(
        sources: Annotated[list[str], typer.Argument(
            help="Image files, folders, URLs, tables, WebDataset shards or HF datasets.")],
        model: Model = None, priority: Priority = 0, idempotency_key: Idem = None,
        wait: Wait = False, cache: Cache = True, image_col: ImageCol = None,
        id_col: IdCol = None, split: Split = None, limit: Limit = None, sample: Sample = None,
        api: ApiOpt = None, api_key: KeyOpt = None,
    ) -> None:
        opts = DatasetOpts(image_col, {}, id_col, split, limit, sample)
        urls = [s for s in sources if s.startswith(("http://", "https://"))]
        rest = [s for s in sources if s not in urls]
        local_sources = image_sources(rest, spec, opts) if rest else iter(())

        def found() -> Iterator[Source]:
            yield from (Source({"image_url": u}, {"file": u}) for u in urls)
            for src in local_sources:
                if src.path is not None and src.metadata.get("file") == str(src.path):
                    src.metadata["file"] = src.path.name  # a file named on its own: its name
                yield src

        items = _items(limit_sources(found(), opts))
        submit_opts = {"model": model, "priority": priority, "idempotency_key": idempotency_key,
                       "cache": cache}
        _send(api, api_key, wait, lambda c: _submit(c, spec, items, submit_opts))

    command.__doc__ = f"{spec.summary[:1].upper()}{spec.summary[1:]}: local files and datasets " \
        "are uploaded in bounded requests, URLs are fetched by the workers."
    return command


def image_text_command(spec: tasks.TaskSpec) -> Callable[..., None]:
    field = spec.texts[0]

    def command(
        image: Annotated[str | None, typer.Argument(
            help="Image file or URL, or a dataset with a text column.")] = None,
        text: Annotated[str | None, typer.Argument(metavar=field.upper())] = None,
        rows_file: Annotated[Path | None, typer.Option(
            f"--{field}s", help=f"JSONL rows {{file, {', '.join(spec.texts)}}}.")] = None,
        model: Model = None, priority: Priority = 0, idempotency_key: Idem = None,
        wait: Wait = False, cache: Cache = True, image_col: ImageCol = None,
        text_col: Annotated[str | None, typer.Option(
            f"--{field}-col", help=f"Datasets: the {field} column.")] = None,
        id_col: IdCol = None, split: Split = None, limit: Limit = None, sample: Sample = None,
        api: ApiOpt = None, api_key: KeyOpt = None,
    ) -> None:
        opts = DatasetOpts(image_col, {field: text_col}, id_col, split, limit, sample)
        found: Iterable[Source]
        if rows_file:
            found = []
            for r in read_questions(rows_file, spec.texts):
                src = str(r["file"])
                meta = {k: v for k, v in r.items() if k not in spec.texts}
                texts = {t: r[t] for t in spec.texts}
                if src.startswith(("http://", "https://")):
                    found.append(Source({**texts, "image_url": src}, meta))
                else:
                    found.append(Source(texts, meta, path=resolve_file(src, rows_file.parent)))
        elif image and not text and is_dataset(image):
            found = dataset_sources(image, spec, opts)
        elif image and text and len(spec.texts) == 1:
            found = [Source({field: text, "image_url": image}, {"file": image})
                     if image.startswith(("http://", "https://"))
                     else Source({field: text}, {"file": image}, path=Path(image))]
        else:
            raise fail(f"give IMAGE {field.upper()}, --{field}s FILE.jsonl, or a dataset")
        items = _items(limit_sources(found, opts))
        submit_opts = {"model": model, "priority": priority, "idempotency_key": idempotency_key,
                       "cache": cache}
        _send(api, api_key, wait, lambda c: _submit(c, spec, items, submit_opts))

    command.__doc__ = f"{spec.summary[:1].upper()}{spec.summary[1:]} (IMAGE {field.upper()}, " \
        f"--{field}s FILE.jsonl, or a dataset with --{field}-col)."
    return command


def text_command(spec: tasks.TaskSpec) -> Callable[..., None]:
    field = spec.texts[0]

    def command(
        text: Annotated[str | None, typer.Argument(metavar=field.upper())] = None,
        texts_file: Annotated[Path | None, typer.Option(
            f"--{field}s", help=f"Text file, one {field} a line, or a dataset.")] = None,
        seed: Annotated[int | None, typer.Option(
            min=0, max=tasks.SEED_MAX, help="Item i uses SEED + i.")] = None,
        variants: Annotated[int, typer.Option(min=1, max=64, help="Items per line.")] = 1,
        model: Model = None, priority: Priority = 0, idempotency_key: Idem = None,
        wait: Wait = False, cache: Cache = True,
        text_col: Annotated[str | None, typer.Option(
            f"--{field}-col", help=f"Datasets: the {field} column.")] = None,
        id_col: IdCol = None, split: Split = None, limit: Limit = None, sample: Sample = None,
        api: ApiOpt = None, api_key: KeyOpt = None,
    ) -> None:
        opts = DatasetOpts(None, {field: text_col}, id_col, split, limit, sample)
        rows = text_rows(spec, text, texts_file, opts)
        base = choose_seed(seed) if spec.seeded else 0
        items = ({**it["input"], "metadata": it["metadata"]}
                 for it in text_items(spec, rows, base, variants))
        submit_opts = {"model": model, "priority": priority, "idempotency_key": idempotency_key,
                       "cache": cache}
        _send(api, api_key, wait, lambda c: _submit(c, spec, items, submit_opts))

    command.__doc__ = f"{spec.summary[:1].upper()}{spec.summary[1:]} ({field.upper()}, or " \
        f"--{field}s FILE.txt or a dataset)."
    return command


def command_for(spec: tasks.TaskSpec, image: Callable[[tasks.TaskSpec], Callable[..., None]],
                image_text: Callable[[tasks.TaskSpec], Callable[..., None]],
                text: Callable[[tasks.TaskSpec], Callable[..., None]]) -> Callable[..., None]:
    """The command builder for a task's shape of input (shared with the embedded commands)."""
    if spec.image and spec.texts:
        return image_text(spec)
    if spec.image:
        return image(spec)
    if spec.texts:
        return text(spec)
    raise ValueError(f"task {spec.name!r} takes neither an image nor a text")


def finetune_command(
    table: Annotated[str, typer.Argument(help="A labelled table: an image column and a caption "
                                              "column and/or question + answer columns.")],
    name: Annotated[str, typer.Option(help="The name to register (then --model NAME).")],
    base: Annotated[str, typer.Option(help="loom-shapes or one of your models.")] = "loom-shapes",
    image_col: Annotated[str | None, typer.Option(help="The image column.")] = None,
    caption_col: Annotated[str | None, typer.Option(help="The caption column.")] = "caption",
    question_col: Annotated[str | None, typer.Option(help="The question column.")] = None,
    answer_col: Annotated[str | None, typer.Option(help="The answer column.")] = "answer",
    split: Annotated[str | None, typer.Option(help="HF datasets: the split.")] = None,
    steps: Annotated[int, typer.Option(min=1)] = 1500,
    lr: float = 1e-3,
    batch: Annotated[int, typer.Option(min=1)] = 32,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    val_fraction: float = 0.1,
    api: ApiOpt = None, api_key: KeyOpt = None, wait: Wait = False,
) -> None:
    """Fine-tune on a labelled table on the API's workers: the images and rows are uploaded,
    one finetune job trains and registers NAME (resumed on another worker if one dies)."""
    from loom.cli.inputs import labelled_rows
    from loom.config import Settings

    def rows() -> Iterator[dict[str, Any]]:
        for labels, image in labelled_rows(table, image_col=image_col, caption_col=caption_col,
                                           question_col=question_col, answer_col=answer_col,
                                           split=split):
            key = "image_bytes" if isinstance(image, bytes) else "image_path"
            yield {**labels, key: image if isinstance(image, bytes) else str(image)}

    hyper = {"steps": steps, "lr": lr, "batch": batch, "seed": seed}
    _send(api, api_key, wait,
          lambda c: c.submit_finetune(rows(), name=name, base=base, hyper=hyper,
                                      val_fraction=val_fraction,
                                      s3_endpoint_url=Settings().s3_endpoint_url))


def register(app: typer.Typer) -> None:
    """Add ``loom submit <command>`` for every task in the registry, and ``finetune``."""
    submit_app = typer.Typer(help="Submit a job to a Loom API (remote; needs --api).",
                             no_args_is_help=True)
    for spec in tasks.REGISTRY.values():
        submit_app.command(spec.command)(
            command_for(spec, image_command, image_text_command, text_command))
    submit_app.command("finetune")(finetune_command)
    app.add_typer(submit_app, name="submit")
