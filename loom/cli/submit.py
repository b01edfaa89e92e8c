"""``loom submit <task command> ...``: remote submission through ``loom.client``. The task
commands are loom.cli.task_commands' (the same as the embedded ones), on the remote backend
here; ``loom submit finetune`` uploads a labelled table."""

# No postponed annotations: the command builders put closure values (a task's field names)
# into the Typer annotations, which must be evaluated where they are written.

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any

import typer

from loom import tasks
from loom.cli import task_commands
from loom.cli.common import ApiOpt, KeyOpt, console, fail, follow, print_job, remote
from loom.cli.inputs import Source
from loom.cli.task_commands import Gathered

Wait = Annotated[bool, typer.Option("--wait", help="Follow progress until the job finishes.")]
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


def _docs(spec: tasks.TaskSpec) -> str:
    summary = f"{spec.summary[:1].upper()}{spec.summary[1:]}"
    field = spec.texts[0] if spec.texts else ""
    if spec.image and spec.texts:
        return (f"{summary} (IMAGE {field.upper()}, --{field}s FILE.jsonl, or a dataset with "
                f"--{field}-col) on a Loom API.")
    if spec.image:
        return (f"{summary} on a Loom API: local files and datasets are uploaded in bounded "
                "requests, URLs are fetched by the workers.")
    return f"{summary} ({field.upper()}, or --{field}s FILE.txt or a dataset) on a Loom API."


class RemoteBackend:
    """``loom submit <task>``: the gathered items go to a Loom API (``loom.client``)."""

    def options(self, spec: tasks.TaskSpec) -> Callable[..., None]:
        def options(priority: Priority = 0, idempotency_key: Idem = None, wait: Wait = False,
                    api: ApiOpt = None, api_key: KeyOpt = None) -> None: ...

        return options

    def doc(self, spec: tasks.TaskSpec) -> str:
        return _docs(spec)

    def run(self, g: Gathered) -> None:
        o = g.options

        def named(sources: Iterable[Source]) -> Iterator[Source]:
            for src in sources:
                if src.path is not None and src.metadata.get("file") == str(src.path):
                    src.metadata["file"] = src.path.name  # a file named on its own: its name
                yield src

        meta = task_commands.job_metadata(g)
        items = _items(named(g.sources) if not g.spec.texts else g.sources)
        submit_opts = {"model": g.model, "priority": o["priority"],
                       "idempotency_key": o["idempotency_key"], "cache": g.cache,
                       "metadata": meta, "params": g.params or None}
        _send(o["api"], o["api_key"], o["wait"], lambda c: _submit(c, g.spec, items, submit_opts))


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
    task_commands.register(submit_app, RemoteBackend())
    submit_app.command("finetune")(finetune_command)
    app.add_typer(submit_app, name="submit")
