"""Engine and session factory, plus programmatic Alembic migrations.

SQLite is the embedded default and PostgreSQL the distributed one; the same code runs on both.
On SQLite every connection gets WAL (readers never block the writer), a long busy_timeout (writers
queue instead of failing with "database is locked") and enforced foreign keys.
"""

from __future__ import annotations

import sqlite3
import time
import weakref
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000

# Execution option read by the SQLite "begin" hook: "IMMEDIATE" takes the write lock up front.
SQLITE_BEGIN_OPTION = "loom_sqlite_begin"

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def is_sqlite(url_or_engine: str | Engine) -> bool:
    url = url_or_engine if isinstance(url_or_engine, str) else str(url_or_engine.url)
    return url.startswith("sqlite")


# What a worker process passes as ``ping_idle_seconds``: its connections are checked out several
# times per batch, and a ping on every checkout was a third of the control plane's client time.
WORKER_PING_IDLE_SECONDS = 1.0


def make_engine(url: str, *, ping_idle_seconds: float | None = None, **kwargs: Any) -> Engine:
    """Create an engine with Loom's connection settings for SQLite or PostgreSQL.

    PostgreSQL connections are pinged before use, so a database restart does not surface as
    errors on the next requests: on every checkout by default, or, with ``ping_idle_seconds``,
    only when the connection sat unused in the pool that long (a hot loop then pays no extra
    round trip; a restart within that window fails one statement, which invalidates the whole
    pool, and the caller's outage handling retries)."""
    if not is_sqlite(url):
        if ping_idle_seconds is None:
            kwargs.setdefault("pool_pre_ping", True)
            return create_engine(url, **kwargs)
        engine = create_engine(url, **kwargs)
        _ping_when_idle(engine, ping_idle_seconds)
        return engine

    if sqlite3.sqlite_version_info < (3, 35):
        # Claims and completions are single UPDATE ... RETURNING statements.
        raise RuntimeError(
            f"SQLite {sqlite3.sqlite_version} is too old: Loom needs 3.35+ (UPDATE ... RETURNING)"
        )
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (it would emit a deferred BEGIN
        # lazily before DML); the "begin" hook below emits the BEGIN we want instead.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            # WAL + NORMAL is durable against application crashes, which is what we need.
            cur.execute("PRAGMA synchronous=NORMAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _sqlite_on_begin(conn: Connection) -> None:
        # Write transactions start with BEGIN IMMEDIATE: a deferred transaction that reads first
        # and then writes can fail with SQLITE_BUSY without waiting (its snapshot is stale), so
        # read-check-write logic (claims, finalisation) would be racy or flaky under contention.
        mode = conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


# Engines pinged only after sitting idle, and how long (the claim path's own connections,
# loom.jobs.hot_pg, follow the same rule).
_IDLE_PING: weakref.WeakKeyDictionary[Engine, float] = weakref.WeakKeyDictionary()


def idle_ping_seconds(engine: Engine) -> float:
    """How long a connection of ``engine`` may sit unused before it is pinged (0: always)."""
    return _IDLE_PING.get(engine, 0.0)


def _ping_when_idle(engine: Engine, idle_seconds: float) -> None:
    """SQLAlchemy's pessimistic disconnect handling, limited to connections idle that long: a
    DisconnectionError raised at checkout makes the pool replace the connection (it retries the
    checkout, so a dead connection never reaches the caller)."""
    _IDLE_PING[engine] = idle_seconds

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["loom_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("loom_idle_since")
        if since is None or time.monotonic() - since < idle_seconds:
            return  # new, or used moments ago
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as e:
            raise exc.DisconnectionError(f"connection dropped while idle: {e}") from e


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: functions commit and then return ORM objects; callers read their
    # attributes afterwards (often after the session is closed) without another query.
    return sessionmaker(bind=engine, expire_on_commit=False)


def begin_write(session: Session) -> None:
    """Start a write transaction on ``session`` (BEGIN IMMEDIATE on SQLite).

    Mutating functions in loom.jobs commit their own transaction; anything the caller left open
    is committed first so that our transaction starts with the write lock held.
    """
    if session.in_transaction():
        session.commit()
    bind = session.get_bind()
    if is_sqlite(bind):  # type: ignore[arg-type]
        session.connection(execution_options={SQLITE_BEGIN_OPTION: "IMMEDIATE"})
    else:
        session.connection()


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not an ini option: configparser would mangle '%' in passwords.
    cfg.attributes["url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (Alembic ``upgrade head`` by default)."""
    from alembic import command

    command.upgrade(_alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(_alembic_config(url), revision)
