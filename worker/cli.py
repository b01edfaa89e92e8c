"""The ``loom`` console script: the torch-free ``loom.cli`` app plus the embedded commands that run
the model in this process (one per task in the registry: ``caption``, ``ask``, ``generate``,
``embed``; ``search`` and ``run``); ``models`` and ``finetune`` come from worker.model_commands,
``worker`` and ``train`` from worker.host_commands. Heavy imports (torch, the pipeline, the
engine) happen inside the commands.

Embedded mode: SQLite + a local store under LOOM_HOME (default ./.loom); every command records a
real job, so ``loom jobs``, ``loom status ID`` and ``loom results ID`` work on it afterwards.
"""

# No postponed annotations: the command builders put closure values (a task's field names)
# into the Typer annotations, which must be evaluated where they are written.

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from loom import tasks
from loom.cli import build_app
from loom.cli.common import (
    FORMATS,
    Local,
    console,
    err,
    fail,
    local_failures,
    local_job,
    local_rows,
    open_local,
    print_failures,
)
from loom.cli.inputs import (
    DatasetOpts,
    Source,
    choose_seed,
    count_items,
    dataset_sources,
    image_sources,
    is_dataset,
    limit_sources,
    read_questions,
    resolve_file,
    text_items,
    text_rows,
)
from loom.cli.submit import command_for
from worker import host_commands, model_commands
from worker.embedded import start_server
from worker.local_run import (
    EXIT_NOTHING_SUCCEEDED,
    EXIT_SOME_FAILED,
    drive,
    run_embedded,
    sources_of,
)

app = build_app()
model_commands.register(app)


def _resolved(local: Local, ref: str) -> str:
    from loom.cli.common import resolve
    from loom.errors import LoomError

    try:
        return resolve(local, ref)
    except LoomError as exc:
        raise fail(exc.message) from None


def _exit_for(job: dict[str, Any], where: str | None) -> None:
    """Turn the finished job into the command's exit code, saying where the failures are."""
    counts, total = job["counts"], job["item_count"]
    ok, failed = counts.get("succeeded", 0), counts.get("failed", 0)
    if ok == total:
        return
    rows = f"their rows carry an \"error\" in {where}; " if where else ""
    err.print(f"{total - ok} of {total} items did not succeed; {rows}"
              f"loom status {job['id'][:8]} lists them")
    raise typer.Exit(EXIT_NOTHING_SUCCEEDED if ok == 0 else EXIT_SOME_FAILED if failed
                     else EXIT_NOTHING_SUCCEEDED)


def _check(spec: tasks.TaskSpec, model: str | None, local: Local,
           params: dict[str, Any] | None = None) -> str:
    """Refuse an unknown model, or one that does not serve the task, before recording a job."""
    from loom.errors import LoomError

    from loom import jobs

    name = model or local.settings.default_model
    try:
        caps = tasks.caps_for(name)
        if caps is None:  # one of this machine's registered (fine-tuned) models?
            with local.session_factory() as s:
                found = jobs.resolve_model(s, tenant_id=local.tenant_id, ref=name)
                if found is not None:
                    name = found.ref  # the job runs the version that is the latest now
                    caps = jobs.registered_caps(s, tenant_id=local.tenant_id, ref=name)
        tasks.check_model(spec, name, caps, params or {})
    except LoomError as exc:
        raise fail(exc.message) from None
    return name


OUT_FORMATS = (*FORMATS, "parquet", "webdataset", "hf")


def _format_for(out: Path, fmt: str | None) -> str:
    """--format, else the output's suffix (.csv, .json -> coco, .parquet, .tar -> webdataset),
    else jsonl."""
    if fmt is None:
        fmt = {".csv": "csv", ".json": "coco", ".parquet": "parquet",
               ".tar": "webdataset"}.get(out.suffix.lower(), "jsonl")
    if fmt not in OUT_FORMATS:
        raise fail(f"--format must be one of {', '.join(OUT_FORMATS)}")
    return fmt


def _export(local: Local, job: dict[str, Any], out: Path, fmt: str,
            rows: Any = None) -> None:
    """Write the job's results: JSONL/CSV/COCO in the task's own columns, through the same
    exporter as ``loom results --view table``; Parquet, WebDataset and HF datasets with every
    column and the images (loom.datasets)."""
    from loom import datasets, exports

    rows = rows if rows is not None else local_rows(local, job["id"])
    if fmt in datasets.OUTPUT_FORMATS:
        written = datasets.write_rows(fmt, rows, out, task=job["task"],
                                      images=datasets.store_images(local.store),
                                      vectors=datasets.store_vectors(local.store))
        err.print(f"wrote {written.rows} rows to {out}")
        return
    exports.write(out, fmt, rows, job=job, view="table",
                  size_of=exports.store_size(local.store) if fmt == "coco" else None)
    err.print(f"wrote {out}")


def _preview(paths: list[str], spec: tasks.TaskSpec, opts: DatasetOpts,
             job: dict[str, Any]) -> None:
    """After --limit/--sample: the measured rate and what the whole source would take."""
    if opts.limit is None and opts.sample is None:
        return
    rate = job.get("items_per_second")
    total = count_items(paths, spec, opts)
    if rate:
        err.print(f"preview: {job['item_count']} of {total} items at {rate:.1f} items/s; the "
                  f"full run would take about {total / rate:.0f} s on this machine")


Model = Annotated[str | None, typer.Option(help="Model name (default: LOOM_DEFAULT_MODEL).")]
Cache = Annotated[bool, typer.Option(
    "--cache/--no-cache", help="Reuse earlier outputs for the same input, model weights, params "
    "and seed (marked cached).")]
Fmt = Annotated[str | None, typer.Option(
    "--format", "-f", help="jsonl | csv | coco | parquet | webdataset | hf (default: from --out)")]
ImageCol = Annotated[str | None, typer.Option(
    help="Datasets: the image column (URL, path or bytes; default: detected).")]
IdCol = Annotated[str | None, typer.Option(help="Datasets: the id column.")]
Split = Annotated[str | None, typer.Option(help="Hugging Face datasets: the split.")]
Limit = Annotated[int | None, typer.Option(min=1, help="Run only the first N items (preview).")]
Sample = Annotated[int | None, typer.Option(min=1, help="Run a random N items (preview).")]


def image_command(spec: tasks.TaskSpec) -> Any:
    def command(
        paths: Annotated[list[str], typer.Argument(
            help="Image files, folders (recursive), tables (.parquet .csv .tsv .jsonl), "
                 "WebDataset shards (.tar, {00000..00099} patterns) or HF dataset folders.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Output file or folder.")] = Path(
            f"{spec.output_column}s.jsonl"),
        fmt: Fmt = None,
        model: Model = None,
        cache: Cache = True,
        image_col: ImageCol = None, id_col: IdCol = None, split: Split = None,
        limit: Limit = None, sample: Sample = None,
    ) -> None:
        fmt_ = _format_for(out, fmt)
        opts = DatasetOpts(image_col, {}, id_col, split, limit, sample)
        found = image_sources(paths, spec, opts)
        start_server()  # its imports run beside what follows (worker.embedded)
        local = open_local()
        try:
            name = _check(spec, model, local)
            job = run_embedded(local, spec.name, sources_of(found), model=name,
                               use_cache=cache)
            _export(local, job, out, fmt_)
            _preview(paths, spec, opts, job)
            _exit_for(job, str(out))
        finally:
            local.close()

    command.__doc__ = (f"{spec.summary[:1].upper()}{spec.summary[1:]} in this process; one row "
                       f"per image {{\"file\", \"{spec.output_column}\"}}.")
    return command


def image_text_command(spec: tasks.TaskSpec) -> Any:
    field = spec.texts[0]

    def command(
        image: Annotated[str | None, typer.Argument(
            help=f"An image (with {field.upper()}), or a dataset with a {field} column.")]
        = None,
        text: Annotated[str | None, typer.Argument(metavar=field.upper())] = None,
        rows_file: Annotated[Path | None, typer.Option(
            f"--{field}s", help=f"JSONL rows {{file, {', '.join(spec.texts)}}}.")] = None,
        out: Annotated[Path | None, typer.Option(
            "--out", "-o", help=f"Output with {spec.output_column}s.")] = None,
        fmt: Fmt = None,
        model: Model = None,
        cache: Cache = True,
        image_col: ImageCol = None,
        text_col: Annotated[str | None, typer.Option(
            f"--{field}-col", help=f"Datasets: the {field} column.")] = None,
        id_col: IdCol = None, split: Split = None, limit: Limit = None, sample: Sample = None,
    ) -> None:
        opts = DatasetOpts(image_col, {field: text_col}, id_col, split, limit, sample)
        found: Iterator[Source]
        if rows_file:
            rows = read_questions(rows_file, spec.texts)
            found = limit_sources([Source(
                {t: r[t] for t in spec.texts},
                {k: v for k, v in r.items() if k not in spec.texts},  # travels back out
                path=resolve_file(str(r["file"]), rows_file.parent)) for r in rows], opts)
        elif image and not text and is_dataset(image):
            found = limit_sources(dataset_sources(image, spec, opts), opts)
        elif image and text and len(spec.texts) == 1:
            found = iter([Source({field: text}, {"file": image}, path=Path(image))])
        else:
            raise fail(f"give IMAGE {field.upper()}, --{field}s FILE.jsonl, or a dataset")
        single = bool(image and text)
        start_server()  # its imports run beside what follows (worker.embedded)
        local = open_local()
        try:
            name = _check(spec, model, local)
            job = run_embedded(local, spec.name, sources_of(found), model=name,
                               use_cache=cache)
            if single:
                r = next(iter(local_rows(local, job["id"])))
                if not r["output"]:
                    e = r.get("error") or {}
                    raise fail(f"{e.get('code')}: {e.get('message')}" if e else r["status"],
                               EXIT_NOTHING_SUCCEEDED)
                print(r["output"]["text"])
                return
            base = rows_file or Path(str(image))
            target = out or base.with_name(f"{base.stem}.{spec.output_column}s.jsonl")
            _export(local, job, target, _format_for(target, fmt))
            if image and not rows_file:
                _preview([image], spec, opts, job)
            _exit_for(job, str(target))
        finally:
            local.close()

    command.__doc__ = (f"{spec.summary[:1].upper()}{spec.summary[1:]}: IMAGE {field.upper()} "
                       f"prints the {spec.output_column}; --{field}s FILE.jsonl (or a dataset "
                       f"with --{field}-col) writes each row back with \"{spec.output_column}\" "
                       "added.")
    return command


def text_command(spec: tasks.TaskSpec) -> Any:
    field = spec.texts[0]

    def command(
        text: Annotated[str | None, typer.Argument(
            metavar=field.upper(), help=f"A {field} (or --{field}s FILE).")] = None,
        texts_file: Annotated[Path | None, typer.Option(
            f"--{field}s", help=f"Text file, one {field} a line.")] = None,
        out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path(
            "generated"),
        seed: Annotated[int | None, typer.Option(
            min=0, max=tasks.SEED_MAX,
            help="Item i uses SEED + i (default: random, printed).")] = None,
        variants: Annotated[int, typer.Option(min=1, max=64, help="Items per line.")] = 1,
        model: Model = None,
        cache: Cache = True,
        text_col: Annotated[str | None, typer.Option(
            f"--{field}-col", help=f"Datasets: the {field} column.")] = None,
        id_col: IdCol = None, split: Split = None, limit: Limit = None, sample: Sample = None,
    ) -> None:
        opts = DatasetOpts(None, {field: text_col}, id_col, split, limit, sample)
        rows = text_rows(spec, text, texts_file, opts)
        items = text_items(spec, rows, choose_seed(seed) if spec.seeded else 0, variants)
        start_server()  # its imports run beside what follows (worker.embedded)
        local = open_local()
        try:
            name = _check(spec, model, local)
            job = run_embedded(local, spec.name, ((it, None) for it in items), model=name,
                               use_cache=cache)
            out.mkdir(parents=True, exist_ok=True)

            def copied() -> Any:
                # Outputs land beside the index as 00000.png ...; the index names them.
                for r in local_rows(local, job["id"]):
                    o = r["output"]
                    if o and o.get("storage_key"):
                        ext = o["storage_key"].rsplit(".", 1)[-1]
                        o["url"] = f"{r['index']:05d}.{ext}"
                        (out / o["url"]).write_bytes(local.store.get(o["storage_key"]))
                    yield r

            _export(local, job, out / "index.jsonl", "jsonl", copied())
            _exit_for(job, str(out / "index.jsonl"))
        finally:
            local.close()

    command.__doc__ = (f"{spec.summary[:1].upper()}{spec.summary[1:]}: DIR/00000.png ... and "
                       f"DIR/index.jsonl rows {{\"{field}\", \"{spec.output_column}\", \"seed\"}}.")
    return command


for _spec in tasks.REGISTRY.values():
    app.command(_spec.command)(command_for(_spec, image_command, image_text_command, text_command))


@app.command()
def search(
    query: Annotated[str, typer.Argument(help='Text, e.g. "a small red circle above a large '
                                               'blue square".')],
    job_id: Annotated[str, typer.Option("--in", help="The embed job to search (local).")],
    k: Annotated[int, typer.Option("-k", min=1, max=10_000, help="How many to show.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="JSONL rows {rank, score, index, "
                                                         "file}.")] = False,
) -> None:
    """Text-to-image search over an embed job: prints the top k with score and file.

    The query goes through the job model's text encoder into the vectors' space."""
    import json

    from loom import vectors
    from loom.errors import LoomError

    local = open_local()
    try:
        try:
            job = local_job(local, job_id)
            with local.session_factory() as s:
                table = vectors.job_vectors(s, local.store, job_id=job_id,
                                            tenant_id=local.tenant_id)
        except LoomError as exc:
            raise fail(exc.message) from None
        from pipeline import registry

        model = registry.load(job["model"], device=local.settings.device)
        if not hasattr(model, "embed_text"):
            raise fail(f"model {job['model']!r} cannot embed text queries")
        hits = vectors.rank(table, model.embed_text([query])[0], k)
        for n, (row, score) in enumerate(hits, 1):
            file = table.files[row] or f"#{table.indices[row]}"
            if as_json:
                print(json.dumps({"rank": n, "score": round(score, 4),
                                  "index": table.indices[row], "file": file}))
            else:
                console.print(f"{n:>3}  {score:.4f}  {file}")
    finally:
        local.close()


@app.command("run")
def run_cmd(job_id: str) -> None:
    """Run a recorded job's open items on this machine (e.g. after ``loom retry`` or Ctrl-C)."""
    from worker.embedded import EngineProcesses

    start_server()
    local = open_local()
    try:
        job_id = _resolved(local, job_id)
        job = local_job(local, job_id)
        if job["task"] == "finetune":  # resumes from its last checkpoint
            model_commands.report(local, model_commands.run_finetune_job(
                local, job_id, base=job.get("model") or ""))
            return
        with EngineProcesses(local.settings, items=job["item_count"] - job["done"],
                             model=job.get("model")) as engines:
            drive(local, engines, job_id, job["task"], job["item_count"], job["done"])
        job = local_job(local, job_id)
        console.print(f"job {job_id}: {job['status']}")
        print_failures(local_failures(local, job_id))
        _exit_for(job, None)
    finally:
        local.close()


host_commands.register(app)


def main() -> None:  # pragma: no cover
    app()
