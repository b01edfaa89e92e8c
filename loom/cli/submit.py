"""``loom submit <task command> ...``: remote submission through ``loom.client``, one command
per task in the registry. A task's inputs decide the command's shape: images only (``caption``),
images with text (``ask IMAGE QUESTION`` or ``--questions F.jsonl``), or text only and seeded
(``generate PROMPT`` or ``--prompts F.txt``, ``--seed``, ``--variants``)."""

# No postponed annotations: the command builders put closure values (a task's field names)
# into the Typer annotations, which must be evaluated where they are written.

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from loom import tasks
from loom.cli.common import ApiOpt, KeyOpt, console, fail, follow, print_job, remote
from loom.cli.inputs import (
    choose_seed,
    collect_images,
    expand_prompts,
    read_prompts,
    read_questions,
    resolve_file,
)

Wait = Annotated[bool, typer.Option("--wait", help="Follow progress until the job finishes.")]
Model = Annotated[str | None, typer.Option(help="Model name (default: the server's).")]
Priority = Annotated[int, typer.Option(min=0, max=9, help="0 (default) .. 9 (most urgent).")]
Idem = Annotated[str | None, typer.Option("--idempotency-key", help="Retry-safe submission key.")]


def _image_item(src: str, name: str | None = None) -> dict[str, Any]:
    if src.startswith(("http://", "https://")):
        return {"image_url": src, "metadata": {"file": src}}
    data = base64.b64encode(Path(src).read_bytes()).decode()
    return {"image_base64": data, "metadata": {"file": name or src}}


def _need_api(api: str | None) -> str:
    if not api:
        raise fail("remote submission needs --api URL (or LOOM_API_URL)")
    return api


def _send(spec: tasks.TaskSpec, api: str | None, api_key: str | None, wait: bool,
          submit: Callable[[Any], dict[str, Any]]) -> None:
    def run(c: Any) -> None:
        job = submit(c)
        console.print(f"submitted job [bold]{job['id']}[/bold] ({job['item_count']} items)")
        if wait:
            print_job(follow(c.status, job["id"], 1.0))

    remote(run, _need_api(api), api_key)


def image_command(spec: tasks.TaskSpec) -> Callable[..., None]:
    def command(
        sources: Annotated[list[str], typer.Argument(help="Image files, directories or URLs.")],
        model: Model = None, priority: Priority = 0, idempotency_key: Idem = None,
        wait: Wait = False, api: ApiOpt = None, api_key: KeyOpt = None,
    ) -> None:
        urls = [s for s in sources if s.startswith(("http://", "https://"))]
        local = collect_images([s for s in sources if s not in urls]) if len(urls) < len(sources) \
            else []
        opts = {"model": model, "priority": priority, "idempotency_key": idempotency_key}

        def submit(c: Any) -> dict[str, Any]:
            if urls:
                items = [_image_item(u) for u in urls] + [_image_item(str(p), n) for p, n in local]
                return c.submit(spec.name, items, **opts)  # type: ignore[no-any-return]
            return c.submit_files(spec.name, [p for p, _ in local],  # type: ignore[no-any-return]
                                  names=[n for _, n in local], **opts)

        _send(spec, api, api_key, wait, submit)

    command.__doc__ = f"{spec.summary[:1].upper()}{spec.summary[1:]}: local files are uploaded, " \
        "URLs are fetched by the workers."
    return command


def image_text_command(spec: tasks.TaskSpec) -> Callable[..., None]:
    field = spec.texts[0]

    def command(
        image: Annotated[str | None, typer.Argument(help="Image file or URL.")] = None,
        text: Annotated[str | None, typer.Argument(metavar=field.upper())] = None,
        rows_file: Annotated[Path | None, typer.Option(
            f"--{field}s", help=f"JSONL rows {{file, {', '.join(spec.texts)}}}.")] = None,
        model: Model = None, priority: Priority = 0, idempotency_key: Idem = None,
        wait: Wait = False, api: ApiOpt = None, api_key: KeyOpt = None,
    ) -> None:
        if rows_file:
            items = []
            for r in read_questions(rows_file, spec.texts):
                src = str(r["file"])
                if not src.startswith(("http://", "https://")):
                    src = str(resolve_file(src, rows_file.parent))
                items.append({**_image_item(src, str(r["file"])),
                              **{t: r[t] for t in spec.texts}})
        elif image and text and len(spec.texts) == 1:
            items = [{**_image_item(image), field: text}]
        else:
            raise fail(f"give IMAGE {field.upper()} or --{field}s FILE.jsonl")
        _send(spec, api, api_key, wait, lambda c: c.submit(
            spec.name, items, model=model, priority=priority, idempotency_key=idempotency_key))

    command.__doc__ = f"{spec.summary[:1].upper()}{spec.summary[1:]} (IMAGE {field.upper()}, " \
        f"or --{field}s FILE.jsonl)."
    return command


def text_command(spec: tasks.TaskSpec) -> Callable[..., None]:
    field = spec.texts[0]

    def command(
        text: Annotated[str | None, typer.Argument(metavar=field.upper())] = None,
        texts_file: Annotated[Path | None, typer.Option(
            f"--{field}s", help=f"Text file, one {field} a line.")] = None,
        seed: Annotated[int | None, typer.Option(
            min=0, max=tasks.SEED_MAX, help="Item i uses SEED + i.")] = None,
        variants: Annotated[int, typer.Option(min=1, max=64, help="Items per line.")] = 1,
        model: Model = None, priority: Priority = 0, idempotency_key: Idem = None,
        wait: Wait = False, api: ApiOpt = None, api_key: KeyOpt = None,
    ) -> None:
        lines = read_prompts(text, texts_file)
        if spec.seeded:
            items = [{field: p, "seed": s}
                     for p, s in expand_prompts(lines, choose_seed(seed), variants)]
        else:
            items = [{field: p} for p in lines for _ in range(variants)]
        _send(spec, api, api_key, wait, lambda c: c.submit(
            spec.name, items, model=model, priority=priority, idempotency_key=idempotency_key))

    command.__doc__ = f"{spec.summary[:1].upper()}{spec.summary[1:]} ({field.upper()}, or " \
        f"--{field}s FILE.txt)."
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


def register(app: typer.Typer) -> None:
    """Add ``loom submit <command>`` for every task in the registry."""
    submit_app = typer.Typer(help="Submit a job to a Loom API (remote; needs --api).",
                             no_args_is_help=True)
    for spec in tasks.REGISTRY.values():
        submit_app.command(spec.command)(
            command_for(spec, image_command, image_text_command, text_command))
    app.add_typer(submit_app, name="submit")
