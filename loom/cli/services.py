"""Service commands of the ``loom`` CLI: ``api`` (uvicorn), ``ui`` (the job page, embedded),
``db upgrade``, ``keys create``, ``keys webhook-secret``."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from loom.cli.common import err, fail, migrate
from loom.config import Settings


def db_upgrade() -> None:
    """Create or migrate the database (LOOM_DATABASE_URL) to the latest schema."""
    from loom import db

    settings = Settings()
    if settings.database_url.startswith("sqlite"):
        settings.home.mkdir(parents=True, exist_ok=True)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    db.upgrade(settings.database_url)
    err.print("database is up to date")


def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name (created if new).")],
    name: Annotated[str | None, typer.Option(help="A label for the key.")] = None,
) -> None:
    """Create an API key for a tenant; the secret is printed once (only its hash is stored)."""
    from loom import db, tenants
    from loom.errors import LoomError

    settings = Settings()
    migrate(settings)
    engine = db.make_engine(settings.database_url)
    try:
        with db.make_session_factory(engine)() as s:
            _, secret = tenants.create_api_key(s, tenant_name=tenant, name=name)
    except LoomError as exc:
        raise fail(exc.message) from None
    finally:
        engine.dispose()
    err.print(f"API key for tenant {tenant!r} (shown once):")
    print(secret)


def api_cmd(
    host: Annotated[str, typer.Option(envvar="LOOM_API_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="LOOM_API_PORT")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1,
    reload: Annotated[bool, typer.Option(help="Reload on code changes (development).")] = False,
) -> None:
    """Serve the HTTP API (uvicorn, api.main:app)."""
    import uvicorn

    uvicorn.run("api.main:app", host=host, port=port, workers=workers, reload=reload,
                proxy_headers=True)


def ui_cmd(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8765,
) -> None:
    """Serve the job page (/ui) over the local database and store (LOOM_HOME), auth off for the
    local tenant, bound to 127.0.0.1 only."""
    import os

    import uvicorn

    os.environ["LOOM_AUTH"] = "off"  # read by the app factory's Settings() in this process
    settings = Settings()
    if settings.database_url.startswith("sqlite"):
        settings.home.mkdir(parents=True, exist_ok=True)
    migrate(settings)
    err.print(f"the job page: http://127.0.0.1:{port}/ui")
    # By name, like `loom api`: loom/ never imports the api package.
    uvicorn.run("api.main:create_local_app", factory=True, host="127.0.0.1", port=port,
                log_level="warning")


def keys_webhook_secret(
    tenant: Annotated[str, typer.Option(help="Tenant name.")],
) -> None:
    """Print the tenant's webhook signing secret (Standard Webhooks ``whsec_...``)."""
    from loom import db, tenants
    from loom.errors import LoomError

    settings = Settings()
    migrate(settings)
    engine = db.make_engine(settings.database_url)
    try:
        with db.make_session_factory(engine)() as s:
            secret = tenants.webhook_secret(s, tenant_id=tenants.get_tenant(s, name=tenant).id)
    except LoomError as exc:
        raise fail(exc.message) from None
    finally:
        engine.dispose()
    print(secret)


def register(app: typer.Typer) -> None:
    """Add ``api``, ``db upgrade`` and ``keys create`` to ``app``."""
    db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
    db_app.command("upgrade")(db_upgrade)
    keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
    keys_app.command("create")(keys_create)
    keys_app.command("webhook-secret")(keys_webhook_secret)
    app.add_typer(db_app, name="db")
    app.add_typer(keys_app, name="keys")
    app.command("api")(api_cmd)
    app.command("ui")(ui_cmd)
