"""Model commands: ``loom models`` (the built-in ones and your fine-tuned versions) and
``loom finetune`` (a labelled table in, a registered model version out, embedded).

The table's images are stored under the job's input keys and its labels written as the rows
manifest (worker.finetune reads both), then a finetune job with one item is recorded and run by
one engine process that uses every core. Its progress events are printed as they arrive. Ctrl-C
stops between steps and keeps the last checkpoint: ``loom run JOB`` resumes from it.
"""

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from loom import tasks
from loom.cli.common import Local, console, err, fail, local_job, open_local

Opt = typer.Option


def _labelled(local: Local, job_id: str, table: str, *, image_col: str | None,
              caption_col: str | None, question_col: str | None, answer_col: str | None,
              split: str | None) -> Iterator[dict[str, Any]]:
    """Rows {image_key, caption?, question?, answer?}: each image stored under an input key."""
    from loom.cli.inputs import labelled_rows
    from worker.local_run import Pair, _stored

    def pairs() -> Iterator[Pair]:
        for labels, image in labelled_rows(table, image_col=image_col, caption_col=caption_col,
                                           question_col=question_col, answer_col=answer_col,
                                           split=split):
            yield ({"input": {}, "metadata": labels}, image)

    for n, row in enumerate(_stored(local, job_id, pairs()), start=1):
        labels = row["metadata"] or {}
        if labels.get("read_error"):
            raise fail(f"{table}: row {n}: cannot read its image: {labels['read_error']}")
        yield {"image_key": row["input"]["image_key"],
               **{k: v for k, v in labels.items() if k in ("caption", "question", "answer")}}


def _show_events(local: Local, job_id: str, stop: threading.Event) -> None:
    """Print the job's training events as they arrive (step, loss, registration)."""
    from loom import jobs

    seen = 0
    while True:
        last = stop.is_set()  # one more read after the run ended: its final events
        with local.session_factory() as s:
            rows = jobs.training_events(s, job_id=job_id, after_id=seen)
        for r in rows:
            seen = r.id
            d = json.loads(r.message or "{}")
            if r.kind == "training":
                err.print(f"step {d['step']}/{d['steps']}  loss {d['loss']:.4f}")
            elif r.kind == "training_started":
                err.print(f"training on {d['train_rows']} rows ({d['val_rows']} held out) from "
                          f"{d['base']}" + (f", resuming at step {d['resumed_from_step']}"
                                            if d["resumed_from_step"] else ""))
        if last:
            return
        stop.wait(1.0)


def run_finetune_job(local: Local, job_id: str, *, base: str, total: int = 1,
                     done: int = 0) -> dict[str, Any]:
    """Run a recorded finetune job on one engine process with every core, printing progress."""
    from loom import tasks
    from worker.embedded import EngineProcesses
    from worker.local_run import drive

    if base not in tasks.BUILTIN_MODELS:
        base = local.settings.default_model  # what the engine preloads; training reads the file
    stop = threading.Event()
    shower = threading.Thread(target=_show_events, args=(local, job_id, stop), daemon=True)
    # One process, all cores as torch threads: training is one stream of large steps.
    with EngineProcesses(local.settings, processes=1, model=base) as engines:
        shower.start()
        try:
            drive(local, engines, job_id, "finetune", total, done)
        finally:
            stop.set()
            shower.join(timeout=5)
    return local_job(local, job_id)


def register(app: typer.Typer) -> None:
    models_app = typer.Typer(invoke_without_command=True, no_args_is_help=False)
    app.add_typer(models_app, name="models")

    @models_app.command("add")
    def add(
        name: Annotated[str, typer.Argument(help="The name jobs will use (--model NAME).")],
        backend: Annotated[str, typer.Option(help="hf | diffusers | openai")],
        ref: Annotated[str, typer.Option(
            help="A model folder (hf, diffusers) or SERVED_NAME@BASE_URL (openai).")],
        param: Annotated[list[str] | None, typer.Option(
            "--param", help="A default job param KEY=VALUE, repeatable.")] = None,
        api: Annotated[str | None, typer.Option("--api", envvar="LOOM_API_URL")] = None,
        api_key: Annotated[str | None, typer.Option("--api-key", envvar="LOOM_API_KEY")] = None,
    ) -> None:
        """Name a model brought by reference, for your tenant (with --api) or this machine."""
        from loom.errors import LoomError

        params = _alias_params(param)
        if api:
            from loom.client import Client

            with Client(api, api_key) as c:
                row = c.add_model(name, backend=backend, ref=ref, params=params)
            console.print(f"{row['name']} -> {row['ref']}")
            return
        from loom import jobs

        local = open_local()
        try:
            with local.session_factory() as s:
                full = jobs.alias_ref(backend, ref)
                if tasks.backend_of(full) in (tasks.HF_PREFIX, tasks.DIFFUSERS_PREFIX):
                    path = Path(full.split(":", 1)[1]).expanduser()
                    if path.is_dir():  # a folder on this machine: its absolute path
                        full = full.split(":", 1)[0] + ":" + str(path.resolve())
                row = jobs.add_alias(s, tenant_id=local.tenant_id, name=name, ref=full,
                                     params=params)
                console.print(f"{row.name} -> {row.ref}")
        except LoomError as exc:
            raise fail(exc.message) from None
        finally:
            local.close()

    @models_app.command("remove")
    def remove(
        name: str,
        api: Annotated[str | None, typer.Option("--api", envvar="LOOM_API_URL")] = None,
        api_key: Annotated[str | None, typer.Option("--api-key", envvar="LOOM_API_KEY")] = None,
    ) -> None:
        """Forget a model name (jobs that ran it keep the reference they recorded)."""
        from loom.errors import LoomError

        if api:
            from loom.client import Client

            with Client(api, api_key) as c:
                c.remove_model(name)
            return
        from loom import jobs

        local = open_local()
        try:
            with local.session_factory() as s:
                jobs.remove_alias(s, tenant_id=local.tenant_id, name=name)
        except LoomError as exc:
            raise fail(exc.message) from None
        finally:
            local.close()

    @models_app.callback()
    def models(
        ctx: typer.Context,
        api: Annotated[str | None, typer.Option("--api", envvar="LOOM_API_URL")] = None,
        api_key: Annotated[str | None, typer.Option("--api-key", envvar="LOOM_API_KEY")] = None,
    ) -> None:
        """List the models (local registry, or the API's with --api); add or remove names."""
        if ctx.invoked_subcommand is not None:
            return
        if api:
            from loom.client import Client

            with Client(api, api_key) as c:
                for m in c.models():
                    console.print(f"{m['name']}  tasks: {', '.join(m['tasks'])}  "
                                  f"versions: {len(m['versions'])}")
            return
        from loom import jobs
        from pipeline import registry

        for m in registry.list_models():
            weights = "ok" if m.path.is_file() else f"missing ({m.path})"
            console.print(f"{m.name}@{m.version}  tasks: {', '.join(m.tasks)}  weights: {weights}")
        local = open_local()
        try:
            with local.session_factory() as s:
                for r in jobs.registered_models(s, tenant_id=local.tenant_id):
                    d = jobs.model_dict(r)
                    scores = " ".join(f"{k} {v:.1%}" for k, v in d["metrics"].items()
                                      if k in ("val_caption", "val_vqa"))
                    console.print(f"{d['ref']}  fine-tuned from {d['base_model']} on "
                                  f"{d['training_rows']} rows (job {d['finetune_job_id']})"
                                  f"  {scores}")
                for a in jobs.list_aliases(s, tenant_id=local.tenant_id):
                    served = _alias_tasks(a.ref)
                    console.print(f"{a.name} -> {a.ref}  tasks: {', '.join(served) or '?'}"
                                  + (f"  params: {a.params}" if a.params else ""))
        finally:
            local.close()

    @app.command("finetune")
    def finetune_cmd(
        table: Annotated[str, typer.Argument(
            help="A labelled table (.parquet .csv .jsonl, WebDataset shards, HF folder): an "
                 "image column and a caption column and/or question + answer columns.")],
        name: Annotated[str, Opt(help="The name to register (then --model NAME).")],
        base: Annotated[str, Opt(help="The model to start from: loom-shapes or one of your "
                                      "registered models (NAME or NAME@vN).")] = "loom-shapes",
        image_col: Annotated[str | None, Opt(help="The image column (default: detected).")]
        = None,
        caption_col: Annotated[str | None, Opt(help="The caption column.")] = "caption",
        question_col: Annotated[str | None, Opt(help="The question column.")] = None,
        answer_col: Annotated[str | None, Opt(help="The answer column.")] = "answer",
        split: Annotated[str | None, Opt(help="Hugging Face datasets: the split.")] = None,
        steps: Annotated[int, Opt(min=1, help="Optimiser steps.")] = 1500,
        lr: Annotated[float, Opt(help="Peak learning rate.")] = 1e-3,
        batch: Annotated[int, Opt(min=1, help="Labelled rows per step (of each kind).")] = 32,
        seed: Annotated[int, Opt(min=0, help="Seed of the split and the batches.")] = 0,
        val_fraction: Annotated[float, Opt(help="Rows held out to score the result.")] = 0.1,
    ) -> None:
        """Fine-tune a model on your labelled rows and register it as NAME (a new version each
        run): new words are learned, and --model NAME then works on every command."""
        from loom import finetune as spec
        from loom import jobs, storage, tasks
        from loom.errors import LoomError
        from loom.jobs.registry import check_name
        from loom.models import new_id

        local = open_local()
        try:
            hyper = {"steps": steps, "lr": lr, "batch": batch, "seed": seed}
            try:
                check_name(name)
                spec.check_hyper(hyper)
                with local.session_factory() as s:
                    ok = base in tasks.BUILTIN_MODELS or jobs.resolve_model(
                        s, tenant_id=local.tenant_id, ref=base) is not None
                if not ok:
                    raise fail(f"--base: unknown model {base!r} (loom-shapes, or one of yours: "
                               "loom models)")
            except LoomError as exc:
                raise fail(exc.message) from None
            job_id = new_id()
            t0 = time.monotonic()
            lines = [json.dumps(r, sort_keys=True) for r in _labelled(
                local, job_id, table, image_col=image_col, caption_col=caption_col,
                question_col=question_col, answer_col=answer_col, split=split)]
            if not lines:
                raise fail(f"{table}: no labelled rows")
            data = ("\n".join(lines) + "\n").encode()
            rows_key = storage.training_key(local.tenant_id, job_id, "rows.jsonl")
            local.store.put(rows_key, data, "application/x-ndjson")
            item = {"rows_key": rows_key, "rows_sha256": hashlib.sha256(data).hexdigest(),
                    "rows": len(lines), "name": name, "base": base, "hyper": hyper,
                    "val_fraction": val_fraction}
            try:
                spec.check_input(item)
            except LoomError as exc:
                raise fail(exc.message) from None
            err.print(f"{len(lines)} labelled rows read in {time.monotonic() - t0:.1f}s")
            with local.session_factory() as s:
                jobs.submit_job(s, job_id=job_id, tenant_id=local.tenant_id, task=spec.TASK,
                                model_name=base, items=[{"input": item}], chunk_size=1,
                                max_attempts=local.settings.max_attempts, use_cache=False)
            job = run_finetune_job(local, job_id, base=base)
            report(local, job)
        finally:
            local.close()


def report(local: Local, job: dict[str, Any]) -> None:
    """The registered version and its scores, or why the job did not produce one."""
    from loom import jobs
    from worker.local_run import EXIT_NOTHING_SUCCEEDED

    with local.session_factory() as s:
        found = jobs.registered_for_job(s, job_id=job["id"])
        info = jobs.model_dict(found) if found is not None else None
    if info is None:
        from loom.cli.common import local_failures, print_failures

        console.print(f"job {job['id']}: {job['status']}")
        print_failures(local_failures(local, job["id"]))
        raise typer.Exit(EXIT_NOTHING_SUCCEEDED)
    m = info["metrics"]
    scores = ", ".join(f"{k[4:]} {m[k]:.1%}" for k in ("val_caption", "val_vqa") if k in m)
    console.print(f"registered [bold]{info['ref']}[/bold] (job {job['id']}): "
                  f"{m.get('train_rows')} rows, {m.get('steps')} steps in {m.get('seconds')} s"
                  + (f"; held-out {scores}" if scores else "")
                  + (f"; new words: {' '.join(m['new_words'])}" if m.get("new_words") else ""))
    console.print(f"use it: loom caption IMAGES --model {info['name']}")


def _alias_params(pairs: list[str] | None) -> dict[str, Any]:
    """A name's default ``--param`` values, each checked by a task that takes it (a name may
    serve several tasks)."""
    from loom.cli.task_commands import read_params
    from loom.errors import InvalidRequest

    out = read_params(pairs)
    for key, value in out.items():
        specs = [s for s in tasks.inference() if s.param(key) is not None]
        if not specs:
            raise fail(f"--param {key}: no task takes it")
        try:
            out[key] = specs[0].validate_params({key: value})[key]
        except InvalidRequest as exc:
            raise fail(exc.message) from None
    return out


def _alias_tasks(ref: str) -> tuple[str, ...]:
    """What a named reference serves: read from its folder when it is on this machine."""
    prefix = tasks.backend_of(ref)
    if prefix in (tasks.HF_PREFIX, tasks.DIFFUSERS_PREFIX):
        path = Path(ref[len(prefix):])
        if path.is_dir():
            from pipeline import hf_caps

            return hf_caps.describe(path)[0]
    caps = tasks.caps_for(ref)
    return caps.tasks if caps else ()
