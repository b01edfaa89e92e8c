"""The task commands, built once per task in the registry from its spec, for both places a job
can run: embedded on this machine (``loom caption``, ``loom ask``, ``loom generate``, ``loom
embed``; the backend is in worker/cli.py, which has the engine) and on a Loom API (``loom submit
<task>``; the backend is loom/cli/submit.py).

A task's inputs decide the command's shape: images only (``caption PATHS...``), images with text
(``ask IMAGE QUESTION``, ``--questions F.jsonl`` or a dataset with ``--question-col``), or text
only (``generate PROMPT``, ``--prompts F.txt`` or a dataset; seeded tasks take ``--seed`` and
``--variants``). The command gathers the items the same way for both backends and hands them over
as ``Source``s; the backend adds its own options (``--out``/``--format`` embedded; ``--api``,
``--wait``, ``--priority`` remotely) and does the rest.
"""

# No postponed annotations: the builders put closure values (a task's field names) into the
# Typer annotations, which must be evaluated where they are written.

import inspect
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

import typer

from loom import tasks
from loom.cli.common import fail
from loom.datasets import columns
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


@dataclass
class Gathered:
    """What a task command read from its arguments, for its backend to run."""

    spec: tasks.TaskSpec
    sources: Iterator[Source]  # the items, streamed; limit/sample applied
    model: str | None
    cache: bool
    opts: DatasetOpts
    paths: list[str] = field(default_factory=list)  # the sources named (a --limit preview)
    single: bool = False  # ``ask IMAGE QUESTION``: one item, its answer printed
    origin: Path | None = None  # the rows file or image that results are written beside
    options: dict[str, Any] = field(default_factory=dict)  # the backend's own options
    params: dict[str, Any] = field(default_factory=dict)  # the job's (--prompt, --param)


class Backend(Protocol):
    def options(self, spec: tasks.TaskSpec) -> Callable[..., None]:
        """A function whose signature is the backend's own options for ``spec``'s command
        (keyword options with defaults; only the signature is read)."""
        ...

    def doc(self, spec: tasks.TaskSpec) -> str:
        """The command's help text."""
        ...

    def run(self, g: Gathered) -> None: ...


def job_metadata(g: Gathered) -> dict[str, Any] | None:
    """The job's metadata: the dataset's description (its results keep the user's columns),
    read from the first source (which stays in ``g.sources``)."""
    first = next(g.sources, None)
    if first is None:
        return None
    g.sources = itertools.chain([first], g.sources)
    return {columns.KEY: first.columns} if first.columns else None


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def read_params(pairs: list[str] | None) -> dict[str, Any]:
    """``--param KEY=VALUE`` pairs, VALUE read as JSON when it is JSON (else text)."""
    raw: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise fail(f"--param {pair!r}: expected KEY=VALUE")
        try:
            raw[key.strip()] = json.loads(value)
        except ValueError:
            raw[key.strip()] = value
    return raw


def parse_params(spec: tasks.TaskSpec, pairs: list[str] | None,
                 prompt: str | None = None) -> dict[str, Any]:
    """``--param KEY=VALUE`` (VALUE read as JSON when it is JSON: 64, 0.7, true, {...}; else
    text) and ``--prompt``, checked against the task's params (unknown ones are named)."""
    from loom.errors import InvalidRequest

    raw = read_params(pairs)
    if prompt is not None:
        raw["prompt"] = prompt
    try:
        return spec.validate_params(raw, where="params")
    except InvalidRequest as exc:
        raise fail(exc.message) from None


Prompt = Annotated[str | None, typer.Option(
    help="The instruction for each image, for models that take one (not loom-shapes); "
         "{column} is filled from a dataset's column, e.g. \"Describe the {category}\".")]
Params = Annotated[list[str] | None, typer.Option(
    "--param", help="A model parameter KEY=VALUE, repeatable: max_new_tokens=64, "
                    "temperature=0.7, top_p=0.9, seed=1, num_inference_steps=30, ...")]


def _command(spec: tasks.TaskSpec, backend: Backend, shared: Callable[..., Gathered]) -> Any:
    """A Typer command whose parameters are ``shared``'s, the job params' (``--prompt`` where
    the task takes an instruction, ``--param``), then the backend's own; it gathers with
    ``shared`` and hands the result to the backend."""
    own = inspect.signature(backend.options(spec)).parameters
    params = list(inspect.signature(shared).parameters.values())
    takes_prompt = spec.param("prompt") is not None and "prompt" not in spec.texts
    if takes_prompt:
        params.append(inspect.Parameter("prompt", inspect.Parameter.KEYWORD_ONLY,
                                        default=None, annotation=Prompt))
    params.append(inspect.Parameter("param", inspect.Parameter.KEYWORD_ONLY, default=None,
                                    annotation=Params))
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own.values()]
    own_names = set(own)

    def command(**kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in own_names}
        job_params = parse_params(spec, kwargs.pop("param"), kwargs.pop("prompt", None))
        if "seed" in job_params and spec.seeded:  # generate's --seed is its own option
            raise fail("--param seed: give the base seed as --seed")
        g = shared(**kwargs)
        g.options = options
        g.params = job_params
        backend.run(g)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = backend.doc(spec)
    command.__name__ = spec.command
    return command


Model = Annotated[str | None, typer.Option(
    help="Model name (default: LOOM_DEFAULT_MODEL, or the server's).")]
Cache = Annotated[bool, typer.Option(
    "--cache/--no-cache", help="Reuse earlier outputs for the same input, model weights, params "
    "and seed (marked cached).")]
ImageCol = Annotated[str | None, typer.Option(
    help="Datasets: the image column (URL, path or bytes; default: detected).")]
IdCol = Annotated[str | None, typer.Option(help="Datasets: the id column.")]
Split = Annotated[str | None, typer.Option(help="Hugging Face datasets: the split.")]
Limit = Annotated[int | None, typer.Option(min=1, help="Run only the first N items (preview).")]
Sample = Annotated[int | None, typer.Option(min=1, help="Run a random N items (preview).")]


def image_command(spec: tasks.TaskSpec, backend: Backend) -> Any:
    def shared(
        paths: Annotated[list[str], typer.Argument(
            help="Image files, folders (recursive), URLs, tables (.parquet .csv .tsv .jsonl), "
                 "WebDataset shards (.tar, {00000..00099} patterns) or HF dataset folders.")],
        model: Model = None,
        cache: Cache = True,
        image_col: ImageCol = None, id_col: IdCol = None, split: Split = None,
        limit: Limit = None, sample: Sample = None,
    ) -> Gathered:
        opts = DatasetOpts(image_col, {}, id_col, split, limit, sample)
        urls = [s for s in paths if _is_url(s)]
        rest = [s for s in paths if not _is_url(s)]
        local = image_sources(rest, spec, opts) if rest else iter(())

        def found() -> Iterator[Source]:
            yield from (Source({"image_url": u}, {"file": u}) for u in urls)
            yield from local

        return Gathered(spec, limit_sources(found(), opts), model, cache, opts, paths=paths)

    return _command(spec, backend, shared)


def image_text_command(spec: tasks.TaskSpec, backend: Backend) -> Any:
    name = spec.texts[0]

    def shared(
        image: Annotated[str | None, typer.Argument(
            help=f"An image file or URL (with {name.upper()}), or a dataset with a {name} "
                 "column.")] = None,
        text: Annotated[str | None, typer.Argument(metavar=name.upper())] = None,
        rows_file: Annotated[Path | None, typer.Option(
            f"--{name}s", help=f"JSONL rows {{file, {', '.join(spec.texts)}}} (file: a path "
                               "or URL); the other fields travel back out.")] = None,
        model: Model = None,
        cache: Cache = True,
        image_col: ImageCol = None,
        text_col: Annotated[str | None, typer.Option(
            f"--{name}-col", help=f"Datasets: the {name} column.")] = None,
        id_col: IdCol = None, split: Split = None, limit: Limit = None, sample: Sample = None,
    ) -> Gathered:
        opts = DatasetOpts(image_col, {name: text_col}, id_col, split, limit, sample)
        found: Iterable[Source]
        paths: list[str] = []
        if rows_file:
            found = [_row_source(r, spec, rows_file) for r in read_questions(rows_file,
                                                                             spec.texts)]
        elif image and not text and is_dataset(image):
            found, paths = dataset_sources(image, spec, opts), [image]
        elif image and text and len(spec.texts) == 1:
            found = [Source({name: text, "image_url": image}, {"file": image}) if _is_url(image)
                     else Source({name: text}, {"file": image}, path=Path(image))]
        else:
            raise fail(f"give IMAGE {name.upper()}, --{name}s FILE.jsonl, or a dataset")
        return Gathered(spec, limit_sources(found, opts), model, cache, opts, paths=paths,
                        single=bool(image and text),
                        origin=rows_file or (Path(image) if image else None))

    return _command(spec, backend, shared)


def _row_source(row: dict[str, Any], spec: tasks.TaskSpec, rows_file: Path) -> Source:
    src = str(row["file"])
    texts = {t: row[t] for t in spec.texts}
    meta = {k: v for k, v in row.items() if k not in spec.texts}  # travels back out
    if _is_url(src):
        return Source({**texts, "image_url": src}, meta)
    return Source(texts, meta, path=resolve_file(src, rows_file.parent))


def text_command(spec: tasks.TaskSpec, backend: Backend) -> Any:
    name = spec.texts[0]

    def shared(
        text: Annotated[str | None, typer.Argument(
            metavar=name.upper(), help=f"A {name} (or --{name}s FILE).")] = None,
        texts_file: Annotated[Path | None, typer.Option(
            f"--{name}s", help=f"Text file, one {name} a line, or a dataset.")] = None,
        seed: Annotated[int | None, typer.Option(
            min=0, max=tasks.SEED_MAX,
            help="Item i uses SEED + i (default: random, printed).")] = None,
        variants: Annotated[int, typer.Option(min=1, max=64, help="Items per line.")] = 1,
        model: Model = None,
        cache: Cache = True,
        text_col: Annotated[str | None, typer.Option(
            f"--{name}-col", help=f"Datasets: the {name} column.")] = None,
        id_col: IdCol = None, split: Split = None, limit: Limit = None, sample: Sample = None,
    ) -> Gathered:
        opts = DatasetOpts(None, {name: text_col}, id_col, split, limit, sample)
        rows = text_rows(spec, text, texts_file, opts)
        items = text_items(spec, rows, choose_seed(seed) if spec.seeded else 0, variants)
        return Gathered(spec, (Source(it["input"], it["metadata"] or {}) for it in items),
                        model, cache, opts)

    return _command(spec, backend, shared)


def command_for(spec: tasks.TaskSpec, backend: Backend) -> Any:
    """The command for a task's shape of input, running on ``backend``."""
    if spec.image and spec.texts:
        return image_text_command(spec, backend)
    if spec.image:
        return image_command(spec, backend)
    if spec.texts:
        return text_command(spec, backend)
    raise ValueError(f"task {spec.name!r} takes neither an image nor a text")


def register(app: typer.Typer, backend: Backend) -> None:
    """One command per inference task in the registry, on ``backend``."""
    for spec in tasks.inference():
        app.command(spec.command)(command_for(spec, backend))
