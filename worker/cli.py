"""The ``loom`` console script: the torch-free ``loom.cli`` app plus the embedded commands that run
the model in this process (the task commands of loom.cli.task_commands on the embedded backend
here: ``caption``, ``ask``, ``generate``, ``embed``; and ``search`` and ``run``); ``models``
and ``finetune`` come from worker.model_commands, ``worker`` and ``train`` from
worker.host_commands. Heavy imports (torch, the pipeline, the
engine) happen inside the commands.

Embedded mode: SQLite + a local store under LOOM_HOME (default ./.loom); every command records a
real job, so ``loom jobs``, ``loom status ID`` and ``loom results ID`` work on it afterwards.
"""

# No postponed annotations: the backend's options put closure values (a task's output column)
# into the Typer annotations, which must be evaluated where they are written.

from pathlib import Path
from typing import Annotated, Any

import typer

from loom import tasks
from loom.cli import build_app
from loom.cli.common import (
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
from loom.cli import task_commands
from loom.cli.inputs import DatasetOpts, count_items
from loom.cli.task_commands import Gathered
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
    rows = f"their rows carry a \"status\" and \"error_code\" in {where}; " if where else ""
    err.print(f"{total - ok} of {total} items did not succeed; {rows}"
              f"loom status {job['id'][:8]} lists them")
    raise typer.Exit(EXIT_NOTHING_SUCCEEDED if ok == 0 else EXIT_SOME_FAILED if failed
                     else EXIT_NOTHING_SUCCEEDED)


def _check(spec: tasks.TaskSpec, model: str | None, local: Local,
           params: dict[str, Any] | None = None) -> str:
    """Refuse an unknown model, or one that does not serve the task, before recording a job.
    A name added with ``loom models add`` becomes its reference, its params under ``params``
    (which this updates in place)."""
    from loom.errors import LoomError

    from loom import jobs

    name = model or local.settings.default_model
    try:
        if params is not None:
            with local.session_factory() as s:
                name, merged = jobs.resolve_alias(s, tenant_id=local.tenant_id, name=name,
                                                  params=params)
            params.update(merged)
        name, caps = _local_model(name)
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




def _local_model(name: str) -> tuple[str, tasks.ModelCaps | None]:
    """A model folder on this machine (``hf:PATH``, ``diffusers:PATH``) is read here, as the
    engine will read it: its tasks and params exactly (pipeline.hf_caps, JSON files only), and
    its path made absolute (the engine processes and lineage see the same folder)."""
    prefix = tasks.backend_of(name)
    if prefix in (tasks.HF_PREFIX, tasks.DIFFUSERS_PREFIX):
        path = Path(name[len(prefix):]).expanduser()
        if path.is_dir():
            from pipeline import hf_caps

            served, params = hf_caps.describe(path)
            return prefix + str(path.resolve()), tasks.ModelCaps(tasks=served, params=params)
    return name, tasks.caps_for(name)


def _format_for(out: Path, fmt: str | None) -> str:
    """--format, else the output's suffix (.csv, .json -> coco, .parquet, .tar -> webdataset),
    else jsonl."""
    if fmt is None:
        fmt = {".csv": "csv", ".json": "coco", ".parquet": "parquet",
               ".tar": "webdataset"}.get(out.suffix.lower(), "jsonl")
    from loom import results

    if fmt not in results.FORMATS:
        raise fail(f"--format must be one of {', '.join(results.FORMATS)}")
    return fmt


def _export(local: Local, job: dict[str, Any], out: Path, fmt: str,
            rows: Any = None, drop_images: bool = False) -> None:
    """Write the job's results (loom.results): JSONL/CSV/COCO in the task's own columns, as
    ``loom results --view table`` does; Parquet, WebDataset and HF datasets with every column
    and the images."""
    from loom import results

    rows = rows if rows is not None else local_rows(local, job["id"])
    written = results.write(fmt, rows, out, job=job, store=local.store, view="table",
                            drop_images=drop_images)
    err.print(f"wrote {written} rows to {out}" if written is not None else f"wrote {out}")


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


Fmt = Annotated[str | None, typer.Option(
    "--format", "-f", help="jsonl | csv | coco | parquet | webdataset | hf (default: from --out)")]
DropImages = Annotated[bool, typer.Option(
    "--drop-images", help="Leave a dataset's image column out of the results (they keep every "
    "input column, the image as given: path, URL or bytes).")]


class EmbeddedBackend:
    """``loom caption``, ``loom ask``, ...: the gathered items run in engine processes on this
    machine (worker.embedded), and the results are written to ``--out``."""

    def options(self, spec: tasks.TaskSpec) -> Any:
        if spec.image and spec.texts:
            def image_text(
                out: Annotated[Path | None, typer.Option(
                    "--out", "-o", help=f"Output with {spec.output_column}s.")] = None,
                fmt: Fmt = None,
                drop_images: DropImages = False,
            ) -> None: ...

            return image_text
        if spec.image:
            def image(
                out: Annotated[Path, typer.Option("--out", "-o", help="Output file or folder.")]
                = Path(f"{spec.output_column}s.jsonl"),
                fmt: Fmt = None,
                drop_images: DropImages = False,
            ) -> None: ...

            return image

        def text(
            out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]
            = Path("generated"),
        ) -> None: ...

        return text

    def doc(self, spec: tasks.TaskSpec) -> str:
        summary = f"{spec.summary[:1].upper()}{spec.summary[1:]}"
        col = spec.output_column
        if spec.image and spec.texts:
            field = spec.texts[0]
            return (f"{summary}: IMAGE {field.upper()} prints the {col}; --{field}s FILE.jsonl "
                    f"(or a dataset with --{field}-col) writes each row back with \"{col}\" "
                    "added.")
        if spec.image:
            return f"{summary} in this process; one row per image {{\"file\", \"{col}\"}}."
        return (f"{summary}: DIR/00000.png ... and DIR/index.jsonl rows "
                f"{{\"{spec.texts[0]}\", \"{col}\", \"seed\"}}.")

    def run(self, g: Gathered) -> None:
        spec, out = g.spec, g.options["out"]
        target = out
        if spec.image and spec.texts and not g.single:
            base = g.origin or Path("rows")
            target = out or base.with_name(f"{base.stem}.{spec.output_column}s.jsonl")
        fmt = _format_for(target, g.options.get("fmt")) if spec.image and not g.single else None
        start_server()  # its imports run beside what follows (worker.embedded)
        local = open_local()
        try:
            name = _check(spec, g.model, local, g.params)
            meta = task_commands.job_metadata(g)
            job = run_embedded(local, spec.name, sources_of(g.sources), model=name,
                               use_cache=g.cache, metadata=meta, params=g.params)
            if g.single:
                self._print_answer(local, job)
            elif spec.image:
                _export(local, job, target, fmt or "jsonl",
                        drop_images=g.options.get("drop_images", False))
                if g.paths:
                    _preview(g.paths, spec, g.opts, job)
                _exit_for(job, str(target))
            else:
                self._write_generated(local, job, out)
        finally:
            local.close()

    @staticmethod
    def _print_answer(local: Local, job: dict[str, Any]) -> None:
        r = next(iter(local_rows(local, job["id"])))
        if not r["output"]:
            e = r.get("error") or {}
            raise fail(f"{e.get('code')}: {e.get('message')}" if e else r["status"],
                       EXIT_NOTHING_SUCCEEDED)
        print(r["output"]["text"])

    @staticmethod
    def _write_generated(local: Local, job: dict[str, Any], out: Path) -> None:
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


task_commands.register(app, EmbeddedBackend())


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
        from worker.inference import ModelCache

        model = ModelCache(local.settings, session_factory=local.session_factory,
                           store=local.store).get(job["model"])
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
        if not tasks.get(job["task"]).batched:  # training: resumes from its last checkpoint
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
