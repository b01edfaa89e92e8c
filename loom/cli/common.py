"""What every command of the CLI shares: consoles, options, the embedded runtime under
LOOM_HOME, progress bars, job summaries, and the embedded/remote runners."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from loom.config import Settings

console = Console()
err = Console(stderr=True)

ApiOpt = Annotated[
    str | None,
    typer.Option("--api", envvar="LOOM_API_URL", help="Loom API URL (remote mode)."),
]
KeyOpt = Annotated[
    str | None, typer.Option("--api-key", envvar="LOOM_API_KEY", help="API key (remote mode).")
]
VIEWS = ("full", "table")
TERMINAL = ("succeeded", "completed_with_errors", "failed", "cancelled")


# --- embedded runtime ------------------------------------------------------------------------


@dataclass
class Local:
    """Embedded state under LOOM_HOME: SQLite (or LOOM_DATABASE_URL) and the local store."""

    settings: Settings
    engine: Any
    session_factory: Any
    store: Any
    tenant_id: str

    def close(self) -> None:
        self.engine.dispose()


def migrate(settings: Settings) -> None:
    """Bring the database to the latest schema. Embedded SQLite: skipped when a marker says the
    current migrations already ran (Alembic costs seconds per CLI call otherwise)."""
    import hashlib

    from loom import db

    logging.getLogger("alembic").setLevel(logging.WARNING)
    if not settings.database_url.startswith("sqlite"):
        db.upgrade(settings.database_url)
        return
    settings.home.mkdir(parents=True, exist_ok=True)
    versions = sorted(p.name for p in (db.MIGRATIONS_DIR / "versions").glob("*.py"))
    digest = hashlib.sha256("\n".join([settings.database_url, *versions]).encode()).hexdigest()
    marker = settings.home / f".schema-{digest[:16]}"
    db_file = Path(settings.database_url.split(":///", 1)[-1])
    if marker.exists() and db_file.exists():
        return
    db.upgrade(settings.database_url)
    marker.touch()


def open_local(settings: Settings | None = None) -> Local:
    from loom import db, storage, tenants

    settings = settings or Settings()
    migrate(settings)
    engine = db.make_engine(settings.database_url)
    factory = db.make_session_factory(engine)
    with factory() as session:
        tenant_id = tenants.ensure_tenant(session, name=tenants.DEFAULT_TENANT).id
    return Local(settings, engine, factory, storage.store_from_settings(settings), tenant_id)


def client(api: str, api_key: str | None) -> Any:
    from loom.client import Client

    return Client(api, api_key)


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


# --- progress and summaries -------------------------------------------------------------------


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        # The average since start: rich's own speed needs several samples, and a small job
        # finishes in one or two batches.
        speed = task.fields.get("rate") or (task.completed / task.elapsed if task.elapsed else None)
        return Text(f"{speed:.1f} items/s" if speed else "-- items/s", style="cyan")


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
        TextColumn("eta"), TimeRemainingColumn(), TimeElapsedColumn(),
        console=err, transient=False,
    )


def job_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False)
    table.add_column("id", no_wrap=True, min_width=32)
    for name in ("task", "model", "status", "done"):
        table.add_column(name, no_wrap=True)
    table.add_column("created", no_wrap=True)
    for j in jobs:
        table.add_row(
            j["id"], j["task"], j["model"], j["status"], f"{j['done']}/{j['item_count']}",
            str(j["created_at"])[:19].replace("T", " "),
        )
    return table


def print_job(job: dict[str, Any]) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in job["counts"].items() if v)
    rate = job.get("items_per_second")
    eta = job.get("eta_seconds")
    console.print(f"[bold]{job['id']}[/bold]  {job['task']} with {job['model']}: "
                  f"[bold]{job['status']}[/bold]")
    console.print(f"  {job['done']}/{job['item_count']} done ({counts or 'no items'})"
                  + (f", {rate:.1f} items/s" if rate else "")
                  + (f", eta {eta:.0f}s" if eta else ""))
    if job.get("queue"):
        q = job["queue"]
        console.print(f"  waiting: {q['items_ahead']} items ahead ({q['own_items_ahead']} of "
                      f"this tenant's earlier jobs, {q['other_items_ahead']} of other tenants "
                      f"by share); {q['reason']}")
    console.print(f"  created {job['created_at']}, finished {job.get('finished_at') or '-'}")


def print_failures(rows: list[tuple[str, str, str]], limit: int = 20) -> None:
    if not rows:
        return
    table = Table("item", "error", "reason", title=f"{len(rows)} failed", title_justify="left")
    for name, code, message in rows[:limit]:
        table.add_row(name, code, message)
    console.print(table)
    if len(rows) > limit:
        console.print(f"... and {len(rows) - limit} more (loom results ID shows all)")


# --- embedded views (the same dict shapes as the API) --------------------------------------------


def resolve(local: Local, ref: str) -> str:
    """The full id of a job given by its id or a unique prefix of at least 8 characters."""
    from loom import jobs

    with local.session_factory() as s:
        return jobs.resolve_job_id(s, ref=ref, tenant_id=local.tenant_id)


def local_job(local: Local, job_id: str) -> dict[str, Any]:
    from loom import jobs

    with local.session_factory() as s:
        job = jobs.get_job(s, job_id=jobs.resolve_job_id(s, ref=job_id, tenant_id=local.tenant_id),
                           tenant_id=local.tenant_id)
        return jobs.job_dict(job, jobs.job_progress(s, job_id=job.id), jobs.queue_place(
            s, job=job, defaults=jobs.Limits.from_settings(local.settings)))


def local_rows(local: Local, job_id: str) -> Iterator[dict[str, Any]]:
    from loom import exports

    root = local.settings.storage_url.removeprefix("file://")
    job_id = resolve(local, job_id)
    with local.session_factory() as s:
        for row in exports.result_rows(s, job_id=job_id, tenant_id=local.tenant_id):
            out = row.get("output")
            if out and out.get("storage_key"):
                url = local.store.url(out["storage_key"])
                if url is None and local.settings.storage_url.startswith("file://"):
                    url = f"file://{root}/{out['storage_key']}"
                out["url"] = url
            yield row


def local_failures(local: Local, job_id: str) -> list[tuple[str, str, str]]:
    """(file or #index, error code, message) of each failed item: the failed items alone, a
    page at a time (reading every result row of a 5,000-item job took a third of a second)."""
    from loom import exports, jobs

    job_id = resolve(local, job_id)
    found: list[tuple[str, str, str]] = []
    cursor: str | None = None
    with local.session_factory() as s:
        while True:
            page = jobs.list_items(s, job_id=job_id, tenant_id=local.tenant_id,
                                   status="failed", limit=1000, cursor=cursor)
            found.extend(
                (exports.file_name({"metadata": i.item_metadata, "input": i.input})
                 or f"#{i.index}", i.error_code or "", i.error_message or "")
                for i in page.items if i.error_code)
            if page.next_cursor is None:
                return found
            cursor = page.next_cursor


def embedded(func: Any) -> Any:
    """Run ``func(local)`` against the embedded state, turning LoomErrors into messages."""
    from loom.errors import LoomError

    local = open_local()
    try:
        return func(local)
    except LoomError as exc:
        raise fail(exc.message) from None
    finally:
        local.close()


def remote(func: Any, api: str, api_key: str | None) -> Any:
    from loom.client import ApiError

    with client(api, api_key) as c:
        try:
            return func(c)
        except ApiError as exc:
            raise fail(f"{exc.code}: {exc.message}") from None


def follow(get: Any, job_id: str, interval: float) -> dict[str, Any]:
    job = get(job_id)
    with make_progress() as progress:
        bar = progress.add_task(job["task"], total=job["item_count"], rate=None)
        while True:
            progress.update(bar, completed=job["done"], rate=job.get("items_per_second"))
            if job["status"] in TERMINAL:
                return job
            time.sleep(interval)
            job = get(job_id)
