"""The ``loom`` console script: the torch-free ``loom.cli`` app plus the embedded commands that run
the model in this process (``caption``, ``ask``, ``generate``, ``run``), ``worker``, ``models``
and ``train``. Heavy imports (torch, the pipeline, the engine) happen inside the commands.

Embedded mode: SQLite + a local store under LOOM_HOME (default ./.loom); every command records a
real job, so ``loom jobs``, ``loom status ID`` and ``loom results ID`` work on it afterwards.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from loom.cli import (
    Local,
    app,
    console,
    err,
    fail,
    local_failures,
    local_job,
    local_rows,
    make_progress,
    open_local,
    print_failures,
)
from loom.cli_submit import (
    choose_seed,
    collect_images,
    expand_prompts,
    read_prompts,
    read_questions,
    resolve_file,
)

Out = Annotated[Path, typer.Option("--out", "-o", help="Output file.")]


def _ext_of(data: bytes) -> str:
    from loom.errors import InvalidInput
    from loom.media import image_format

    try:
        return image_format(data)
    except InvalidInput:
        return "bin"  # stored anyway: the worker fails this item with the reason


def run_embedded(
    local: Local, task: str, specs: list[dict[str, Any]], files: list[Path | None],
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Record a job (inputs stored under its keys), run it in-process with a progress bar, and
    print the summary. ``specs``: item dicts {"input", "metadata"}; ``files[i]``: the image of
    item i (stored as its input) or None."""
    from loom import jobs, storage
    from loom.models import new_id
    from worker.engine import Engine

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = local.settings
    blobs: list[tuple[int, bytes]] = []
    for i, (spec, path) in enumerate(zip(specs, files)):
        if path is None:
            continue
        try:
            blobs.append((i, path.read_bytes()))
        except OSError as exc:
            blobs.append((i, b""))
            spec["metadata"]["read_error"] = str(exc.strerror)

    job_id = new_id()
    for i, data in blobs:
        key = storage.input_key(local.tenant_id, job_id, i, _ext_of(data))
        local.store.put(key, data, "application/octet-stream")
        specs[i]["input"]["image_key"] = key
    with local.session_factory() as s:
        job = jobs.submit_job(
            s, job_id=job_id, tenant_id=local.tenant_id, task=task,
            model_name=settings.default_model, items=specs, params=params or {},
            chunk_size=settings.chunk_size, max_attempts=settings.max_attempts,
        )
    worker_id = f"cli-{socket.gethostname()}-{os.getpid()}"
    started = time.monotonic()
    with make_progress() as progress:
        bar = progress.add_task(f"{task} {job.id[:8]}", total=len(specs))
        with Engine(settings, session_factory=local.session_factory, store=local.store,
                    worker_id=worker_id) as engine:
            engine.run_job(job.id, progress=lambda n: progress.advance(bar, n))
    elapsed = time.monotonic() - started
    summary = local_job(local, job.id)
    c = summary["counts"]
    console.print(
        f"job [bold]{job.id}[/bold]: {summary['status']} - {c.get('succeeded', 0)} succeeded, "
        f"{c.get('failed', 0)} failed" + (f", {c['cancelled']} cancelled" if c.get("cancelled")
                                          else "")
        + f" in {elapsed:.1f}s, {len(specs) / max(elapsed, 1e-9):.1f} items/s"
    )
    print_failures(local_failures(local, job.id))
    return summary


def _rows(local: Local, job_id: str) -> list[dict[str, Any]]:
    return list(local_rows(local, job_id))


def _error(row: dict[str, Any]) -> str | None:
    e = row.get("error")
    return f"{e['code']}: {e['message']}" if e else None


def _write_table(out: Path, fmt: str, rows: list[dict[str, Any]], cols: list[str],
                 job: Any = None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        with out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in cols} for r in rows)
    else:
        with out.open("w") as f:
            for r in rows:
                f.write(json.dumps({k: v for k, v in r.items() if v is not None or k in cols},
                                   ensure_ascii=False) + "\n")
    err.print(f"wrote {out}")


@app.command()
def caption(
    paths: Annotated[list[str], typer.Argument(help="Image files or directories (recursive).")],
    out: Out = Path("captions.jsonl"),
    fmt: Annotated[str, typer.Option("--format", "-f", help="jsonl | csv | coco")] = "jsonl",
) -> None:
    """Caption images in this process; one row per image {"file", "caption"}."""
    if fmt not in ("jsonl", "csv", "coco"):
        raise fail("--format must be jsonl, csv or coco")
    found = collect_images(paths)
    local = open_local()
    try:
        specs = [{"input": {}, "metadata": {"file": name}} for _, name in found]
        job = run_embedded(local, "caption", specs, [p for p, _ in found])
        rows = _rows(local, job["id"])
        if fmt == "coco":
            from loom import exports

            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("wb") as f:
                for chunk in exports.coco_chunks(rows, {"job_id": job["id"], "task": "caption"}):
                    f.write(chunk)
            err.print(f"wrote {out}")
            return
        table = [
            {"file": (r["metadata"] or {}).get("file"),
             "caption": (r["output"] or {}).get("text"), "error": _error(r)}
            for r in rows
        ]
        _write_table(out, fmt, table, ["file", "caption"] + (["error"] if fmt == "csv" else []))
    finally:
        local.close()


@app.command()
def ask(
    image: Annotated[Path | None, typer.Argument(help="An image (with QUESTION).")] = None,
    question: Annotated[str | None, typer.Argument()] = None,
    questions: Annotated[Path | None, typer.Option(help="JSONL rows {file, question}.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="JSONL with answers.")] = None,
) -> None:
    """Answer questions about images: IMAGE QUESTION prints the answer; --questions FILE.jsonl
    writes each row back with "answer" added."""
    if questions:
        rows = read_questions(questions)
        paths = [resolve_file(str(r["file"]), questions.parent) for r in rows]
    elif image and question:
        rows, paths = [{"file": str(image), "question": question}], [image]
    else:
        raise fail("give IMAGE QUESTION, or --questions FILE.jsonl --out FILE.jsonl")
    local = open_local()
    try:
        specs = [{"input": {"question": r["question"]}, "metadata": {"file": str(r["file"])}}
                 for r in rows]
        job = run_embedded(local, "vqa", specs, list(paths))
        results = _rows(local, job["id"])
        if not questions:
            r = results[0]
            if r["output"]:
                print(r["output"]["text"])
            else:
                raise fail(_error(r) or r["status"])
            return
        answered = []
        for row, r in zip(rows, results):
            answered.append({**row, "answer": (r["output"] or {}).get("text"),
                             **({"error": _error(r)} if r.get("error") else {})})
        target = out or questions.with_name(questions.stem + ".answers.jsonl")
        _write_table(target, "jsonl", answered, list(answered[0]))
    finally:
        local.close()


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="A prompt (or --prompts FILE).")] = None,
    prompts: Annotated[Path | None, typer.Option(help="Text file, one prompt a line.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("generated"),
    seed: Annotated[int | None, typer.Option(min=0, help="Item i uses SEED + i (default: random, printed).")] = None,
    variants: Annotated[int, typer.Option(min=1, max=64, help="Images per prompt.")] = 1,
) -> None:
    """Generate images: DIR/00000.png ... and DIR/index.jsonl rows {"prompt", "file", "seed"}."""
    pairs = expand_prompts(read_prompts(prompt, prompts), choose_seed(seed), variants)
    local = open_local()
    try:
        specs = [{"input": {"prompt": p, "seed": s}, "metadata": None} for p, s in pairs]
        job = run_embedded(local, "generate", specs, [None] * len(specs))
        out.mkdir(parents=True, exist_ok=True)
        index = []
        for r in _rows(local, job["id"]):
            o = r["output"]
            entry: dict[str, Any] = {"prompt": r["input"]["prompt"], "file": None,
                                     "seed": r["input"]["seed"]}
            if o and o.get("storage_key"):
                name = f"{r['index']:05d}.png"
                (out / name).write_bytes(local.store.get(o["storage_key"]))
                entry["file"] = name
            else:
                entry["error"] = _error(r)
            index.append(entry)
        _write_table(out / "index.jsonl", "jsonl", index, ["prompt", "file", "seed"])
    finally:
        local.close()


@app.command("run")
def run_cmd(job_id: str) -> None:
    """Run a recorded job's open items in this process (e.g. after ``loom retry``)."""
    from worker.engine import Engine

    local = open_local()
    try:
        with make_progress() as progress:
            job = local_job(local, job_id)
            bar = progress.add_task(f"{job['task']} {job_id[:8]}", total=job["item_count"],
                                    completed=job["done"])
            with Engine(local.settings, session_factory=local.session_factory,
                        store=local.store, worker_id=f"cli-{os.getpid()}") as engine:
                engine.run_job(job_id, progress=lambda n: progress.advance(bar, n))
        job = local_job(local, job_id)
        console.print(f"job {job_id}: {job['status']}")
        print_failures(local_failures(local, job_id))
    finally:
        local.close()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
def worker(ctx: typer.Context) -> None:
    """Run a Celery worker (queue "loom", one process per GPU); extra args go to celery."""
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", "loom",
            "-c", "1", *ctx.args]
    os.execv(sys.executable, argv)


@app.command()
def models(
    api: Annotated[str | None, typer.Option("--api", envvar="LOOM_API_URL")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="LOOM_API_KEY")] = None,
) -> None:
    """List the models (local registry, or the API's with --api)."""
    if api:
        from loom.client import Client

        with Client(api, api_key) as c:
            for m in c.models():
                console.print(f"{m['name']}  tasks: {', '.join(m['tasks'])}  "
                              f"versions: {len(m['versions'])}")
        return
    from pipeline import registry

    for m in registry.list_models():
        weights = "ok" if m.path.is_file() else f"missing ({m.path})"
        console.print(f"{m.name}@{m.version}  tasks: {', '.join(m.tasks)}  weights: {weights}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
def train(ctx: typer.Context) -> None:
    """Train the shapes model (pipeline.train); arguments are passed through (--help for them)."""
    from pipeline.train import main

    raise typer.Exit(main(list(ctx.args)) or 0)


def main() -> None:  # pragma: no cover
    app()
