"""``loom usage [--since DAY] [--until DAY] [--model M] [--json]``: items by status,
model-seconds and bytes stored per UTC day and model (the definitions: loom/jobs/usage.py).

Embedded by default (the local SQLite under LOOM_HOME, tenant ``local``), or remote with --api
(``GET /v1/usage``: the API key's tenant). The same report either way: a table on a terminal,
tab-separated lines when piped, the API's JSON with --json."""

from __future__ import annotations

import json
from datetime import date
from typing import Annotated, Any

import typer
from rich.table import Table

from loom.cli.common import ApiOpt, KeyOpt, Local, console, embedded, fail, remote

# Columns in this order: what finished, then what is still in flight.
STATUS_COLUMNS = ("succeeded", "failed", "cancelled", "running", "queued")


def _day(value: str | None, option: str) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise fail(f"{option} {value!r}: expected a date, YYYY-MM-DD") from None


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def usage_table(report: dict[str, Any]) -> Table:
    tenant = report["tenant"]["name"] or report["tenant"]["id"]
    table = Table(box=None, pad_edge=False, title_justify="left",
                  title=f"usage of {tenant}, {report['since']} .. {report['until']} (UTC)")
    table.add_column("day", no_wrap=True)
    table.add_column("model", no_wrap=True)
    for name in (*STATUS_COLUMNS, "model s", "stored"):
        table.add_column(name, justify="right", no_wrap=True)

    def cells(row: dict[str, Any]) -> list[str]:
        return [*(f"{row['items'].get(s, 0):,}" for s in STATUS_COLUMNS),
                f"{row['model_seconds']:,.2f}", human_bytes(row["bytes_stored"])]

    for row in report["days"]:
        table.add_row(row["day"], row["model"], *cells(row))
    table.add_section()
    table.add_row("total", report.get("model") or "", *cells(report["total"]), style="bold")
    return table


def usage(
    since: Annotated[str | None, typer.Option(
        help="First UTC day, YYYY-MM-DD (default: 29 days before --until).")] = None,
    until: Annotated[str | None, typer.Option(
        help="Last UTC day, inclusive (default: today).")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    api: ApiOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Items by status, model-seconds and bytes stored per UTC day and model (your tenant)."""
    first, last = _day(since, "--since"), _day(until, "--until")
    if api:
        report = remote(lambda c: c.usage(since=first, until=last, model=model), api, api_key)
    else:
        def run(local: Local) -> dict[str, Any]:
            from loom import jobs

            with local.session_factory() as s:
                return jobs.usage_report(s, tenant_id=local.tenant_id, since=first, until=last,
                                         model=model)

        report = embedded(run)
    if as_json:
        console.print_json(json.dumps(report))
        return
    if console.is_terminal:
        console.print(usage_table(report))
        return
    for row in report["days"]:  # piped: one tab-separated line per day and model, raw numbers
        print("\t".join([row["day"], row["model"],
                         *(str(row["items"].get(s, 0)) for s in STATUS_COLUMNS),
                         str(row["model_seconds"]), str(row["bytes_stored"])]))


def register(app: typer.Typer) -> None:
    """Add ``loom usage`` to ``app``."""
    app.command()(usage)
