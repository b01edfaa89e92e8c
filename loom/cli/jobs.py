"""Job commands, embedded by default (the local SQLite under LOOM_HOME) or remote with --api:
``jobs``, ``status``, ``watch``, ``results``, ``cancel``, ``retry``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from loom.cli.common import (
    VIEWS,
    ApiOpt,
    KeyOpt,
    Local,
    client,
    console,
    embedded,
    err,
    fail,
    follow,
    job_table,
    local_failures,
    local_job,
    local_rows,
    make_progress,
    open_local,
    print_failures,
    print_job,
    remote,
    resolve,
)



def jobs_cmd(
    status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
    api: ApiOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """List recent jobs, newest first."""
    if api:
        found = remote(lambda c: c.jobs(status=status, limit=limit)["jobs"], api, api_key)
    else:
        def run(local: Local) -> list[dict[str, Any]]:
            from loom import jobs

            with local.session_factory() as s:
                page = jobs.list_jobs(s, tenant_id=local.tenant_id, status=status, limit=limit)
                return [jobs.job_dict(j, jobs.job_progress(s, job_id=j.id)) for j in page.items]

        found = embedded(run)
    if console.is_terminal:
        console.print(job_table(found))
        return
    for j in found:  # piped: one tab-separated line per job, nothing truncated
        print("\t".join([j["id"], j["task"], j["model"], j["status"],
                         f"{j['done']}/{j['item_count']}", str(j["created_at"])[:19]]))


def status(
    job_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job as JSON.")] = False,
    api: ApiOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Show a job: status, counts per item status, progress, items/s, ETA, failures."""
    if api:
        def fetch(c: Any) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
            job = c.status(job_id)
            items = c.items(job_id, status="failed", limit=50)["items"]
            return job, [
                ((i.get("metadata") or {}).get("file") or f"#{i['index']}",
                 i["error"]["code"], i["error"].get("message") or "")
                for i in items if i.get("error")
            ]

        job, failures = remote(fetch, api, api_key)
    else:
        job, failures = embedded(lambda local: (local_job(local, job_id),
                                                 local_failures(local, job_id)))
    if as_json:
        console.print_json(json.dumps(job, default=str))
        return
    print_job(job)
    print_failures(failures)


def watch(
    job_id: str,
    interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 1.0,
    api: ApiOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Follow a job's progress live until it finishes."""
    if api:
        with client(api, api_key) as c:
            job = follow_events(c, job_id) or follow(c.status, job_id, interval)
    else:
        local = open_local()
        try:
            job = follow(lambda j: local_job(local, j), job_id, interval)
        finally:
            local.close()
    print_job(job)


def follow_events(c: Any, job_id: str) -> dict[str, Any] | None:
    """Follow the job over its event stream; None when the server has none (older servers:
    the caller polls instead)."""
    from loom.client import ApiError

    job = c.status(job_id)  # an unknown job fails here, not as "no stream"
    try:
        with make_progress() as progress:
            bar = progress.add_task(job["task"], total=job["item_count"], rate=None)
            progress.update(bar, completed=job["done"], rate=job.get("items_per_second"))
            for event in c.events(job["id"]):
                data = event["data"]
                if event["event"] == "progress":
                    progress.update(bar, completed=data["done"], rate=data["items_per_second"])
                elif event["event"] == "finished":
                    progress.update(bar, completed=data["done"])
                    return c.status(job["id"])  # type: ignore[no-any-return]
    except ApiError as exc:
        if exc.http_status in (404, 405):
            return None
        raise
    return None


def results(
    job_id: str,
    fmt: Annotated[str, typer.Option(
        "--format", "-f", help="jsonl | csv | coco | parquet | webdataset | hf")] = "jsonl",
    view: Annotated[str, typer.Option(
        help="full: every field; table: the task's own columns (what embedded runs write)",
    )] = "full",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="File (default: stdout).")] = None,
    drop_images: Annotated[bool, typer.Option(
        "--drop-images", help="Without a dataset's image column.")] = False,
    api: ApiOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Write a job's results (one row per item) as JSONL, CSV, COCO, Parquet, WebDataset or a
    Hugging Face dataset folder (the last three with -o)."""
    from loom import datasets, results

    if fmt not in results.FORMATS:
        raise fail(f"--format must be one of {', '.join(results.FORMATS)}")
    if view not in VIEWS:
        raise fail(f"--view must be one of {', '.join(VIEWS)}")
    if fmt in datasets.OUTPUT_FORMATS and out is None:
        raise fail(f"--format {fmt} writes files: give -o PATH")
    if api and fmt not in results.STREAMED:
        raise fail(f"--format {fmt} is written embedded; remotely use --format parquet "
                   "(datasets.load_dataset('parquet', data_files=...) opens it)")
    if api:
        sink = out.open("wb") if out else sys.stdout.buffer
        try:
            remote(lambda c: sink.writelines(c.results(job_id, format=fmt, view=view,
                                                       drop_images=drop_images)), api, api_key)
        finally:
            if out:
                sink.close()
        if out:
            err.print(f"wrote {out}")
        return

    def run(local: Local) -> None:
        from loom import jobs

        jid = resolve(local, job_id)
        with local.session_factory() as s:
            job = jobs.job_dict(jobs.get_job(s, job_id=jid, tenant_id=local.tenant_id))
        if out is None:
            sys.stdout.buffer.writelines(
                results.stream(fmt, local_rows(local, jid), job=job, store=local.store,
                               view=view, drop_images=drop_images))
            return
        n = results.write(fmt, local_rows(local, jid), out, job=job, store=local.store,
                          view=view, drop_images=drop_images)
        err.print(f"wrote {n} rows to {out}" if n is not None else f"wrote {out}")

    embedded(run)


def cancel(job_id: str, api: ApiOpt = None, api_key: KeyOpt = None) -> None:
    """Cancel a job (queued items at once, running ones after their batch)."""
    if api:
        job = remote(lambda c: c.cancel(job_id), api, api_key)
    else:
        def run(local: Local) -> dict[str, Any]:
            from loom import jobs

            with local.session_factory() as s:
                jobs.cancel_job(s, job_id=resolve(local, job_id), tenant_id=local.tenant_id)
            return local_job(local, job_id)

        job = embedded(run)
    print_job(job)


def retry(job_id: str, api: ApiOpt = None, api_key: KeyOpt = None) -> None:
    """Requeue a job's failed items (remote: workers pick them up)."""
    if api:
        answer = remote(lambda c: c.retry(job_id), api, api_key)
        console.print(f"requeued {answer['requeued']} items")
        print_job(answer["job"])
        return

    def run(local: Local) -> int:
        from loom import jobs

        with local.session_factory() as s:
            return int(jobs.retry_failed(s, job_id=resolve(local, job_id),
                                         tenant_id=local.tenant_id))

    n = embedded(run)
    console.print(f"requeued {n} items; run them with: loom run {job_id}")


def register(app: typer.Typer) -> None:
    """Add the job commands to ``app``."""
    app.command("jobs")(jobs_cmd)
    app.command()(status)
    app.command()(watch)
    app.command()(results)
    app.command()(cancel)
    app.command()(retry)
