"""The claim path's own way to run a statement on PostgreSQL: a pooled psycopg connection in
autocommit, the statement prepared on the server, rows as plain tuples.

Why not a Session: claim and completion are each one statement run as its own transaction, and
SQLAlchemy's layers around it (session transaction, isolation-level switch per call, execution
context, result proxy) cost more client CPU than building the batch itself: about 15 of 46
microseconds per item at batch 32 (bench/control_plane.py). What SQLAlchemy gives a statement
that matters here is kept: the connection comes from the engine's pool (its checkout hooks, e.g.
the idle ping, still run), a connection that broke is invalidated, and a driver error is raised
as SQLAlchemy's exception of the same kind (OperationalError for an outage), as the callers'
outage handling expects.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import Engine, exc
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import TextClause

# ``:name`` binds of a text() statement (not ``::type`` casts) -> psycopg's ``%(name)s``.
_BIND = re.compile(r"(?<![:\w]):(\w+)\b")


def statement(sql: TextClause) -> str:
    """A text() statement in psycopg's parameter style (once, at import)."""
    raw = sql.text
    if "%" in raw:
        raise ValueError("a hot statement may not contain '%' (psycopg would read a placeholder)")
    return _BIND.sub(r"%(\1)s", raw)


class HotConnection:
    """One checked-out connection in autocommit: each ``execute`` is its own transaction."""

    def __init__(self, dbapi: psycopg.Connection[Any]) -> None:
        self._cursor = dbapi.cursor()
        self.last_sql: str | None = None  # for the error, when one is raised

    def execute(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run ``sql`` (from ``statement``) prepared on the server; all rows, as tuples."""
        self.last_sql = sql
        cur = self._cursor.execute(sql, params, prepare=True)
        return cur.fetchall() if cur.description is not None else []


@contextmanager
def hot_connection(session: Session) -> Iterator[HotConnection]:
    """The session's engine's pooled connection, in autocommit, for the length of the block.
    Anything the session had open is committed first, as loom.jobs functions do."""
    if session.in_transaction():
        session.commit()
    engine = session.get_bind()
    assert isinstance(engine, Engine), "the claim path runs on an engine-bound session"
    pooled = engine.raw_connection()
    dbapi: psycopg.Connection[Any] = pooled.driver_connection  # type: ignore[assignment]
    conn = HotConnection(dbapi)
    try:
        dbapi.autocommit = True
        yield conn
    except psycopg.Error as e:
        broken = dbapi.closed or dbapi.broken
        if broken:
            pooled.invalidate(e)
        raise exc.DBAPIError.instance(conn.last_sql, None, e, psycopg.Error,
                                      connection_invalidated=broken) from e
    finally:
        # A connection goes back to the pool as it came: sessions expect transactions.
        if not (dbapi.closed or dbapi.broken):
            try:
                dbapi.autocommit = False
            except psycopg.Error as e:
                pooled.invalidate(e)
        pooled.close()  # back to the pool, or discarded when invalidated
