"""``loom tenants list`` and ``loom tenants limits TENANT``: tenant limits, weights and use, on the
database of LOOM_DATABASE_URL (an operator's commands, like ``loom keys create``; over HTTP the
same is /v1/admin)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from loom.cli.common import console, fail, migrate
from loom.config import Settings


def _show(found: list[Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"id": t.tenant_id, "name": t.name, "limits": vars(t.limits),
                           "overrides": t.overrides, "use": vars(t.use)} for t in found],
                         indent=2))
        return
    table = Table("tenant", "open items", "running", "jobs/min", "max queued", "max running",
                  "per minute", "items/job", "weight")

    def lim(t: Any, name: str) -> str:
        value = getattr(t.limits, name)
        text = "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
        return text + ("*" if name in t.overrides else "")

    for t in found:
        table.add_row(t.name, str(t.use.open_items), str(t.use.running_items),
                      str(t.use.submissions_last_minute), lim(t, "max_queued_items"),
                      lim(t, "max_running_items"), lim(t, "submissions_per_minute"),
                      lim(t, "max_items_per_job"), lim(t, "weight"))
    console.print(table)
    console.print("* set for the tenant; the others are the configured defaults (- no limit)")


def _run(fn: Any) -> Any:
    from loom import db
    from loom.errors import LoomError

    settings = Settings()
    migrate(settings)
    engine = db.make_engine(settings.database_url)
    try:
        with db.make_session_factory(engine)() as s:
            return fn(s, settings)
    except LoomError as exc:
        raise fail(exc.message) from None
    finally:
        engine.dispose()


def list_cmd(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every tenant: its limits in effect and what it uses now."""
    from loom import jobs
    from loom.models import utcnow

    found = _run(lambda s, st: jobs.list_limits(s, defaults=jobs.Limits.from_settings(st),
                                               now=utcnow()))
    _show(found, as_json)


def limits_cmd(
    tenant: Annotated[str, typer.Argument(help="Tenant name.")],
    max_queued: Annotated[int | None, typer.Option(min=1, help="Open (queued or running) items.")] = None,
    max_running: Annotated[int | None, typer.Option(min=1, help="Items running at once, fleet-wide.")] = None,
    per_minute: Annotated[int | None, typer.Option(min=1, help="Job submissions per minute.")] = None,
    max_items_per_job: Annotated[int | None, typer.Option(min=1, help="Items in one job.")] = None,
    weight: Annotated[float | None, typer.Option(min=0.001, help="Fair-share weight.")] = None,
    reset: Annotated[bool, typer.Option(help="Clear the tenant's overrides first.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Set a tenant's limits and weight (the options given); with none, show them."""
    from loom import jobs
    from loom.models import utcnow

    changes = {k: v for k, v in {"max_queued_items": max_queued, "max_running_items": max_running,
                                 "submissions_per_minute": per_minute,
                                 "max_items_per_job": max_items_per_job,
                                 "weight": weight}.items() if v is not None}

    def apply(s: Any, st: Settings) -> list[Any]:
        if changes or reset:
            jobs.set_limits(s, tenant_name=tenant, changes=changes, reset=reset)
        return jobs.list_limits(s, defaults=jobs.Limits.from_settings(st), now=utcnow(),
                                tenant_name=tenant)

    _show(_run(apply), as_json)


def register(app: typer.Typer) -> None:
    tenants_app = typer.Typer(help="Tenant limits, weights and use (operators).",
                              no_args_is_help=True)
    tenants_app.command("list")(list_cmd)
    tenants_app.command("limits")(limits_cmd)
    app.add_typer(tenants_app, name="tenants")
