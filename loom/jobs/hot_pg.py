"""The claim path's own way to run a statement on PostgreSQL: a psycopg connection of its own
per thread, in autocommit, kept open, the statement prepared on the server with a generic plan,
rows as plain tuples.

Why not a Session: claim and completion are each one statement run as its own transaction, and
SQLAlchemy's layers around it (session transaction, isolation-level switch per call, execution
context, result proxy) cost more client CPU than building the batch itself: about 15 of 46
microseconds per item at batch 32 (bench/control_plane.py).

Why not the engine's pooled connections (as until migration 0015): a checkout, two autocommit
switches and a check-in per statement cost about 30 microseconds of client CPU; and on a
connection the sessions share, PostgreSQL's choice of plan for a prepared statement could not be
set for these statements alone. Left to choose, it planned the completion anew on every
execution (its custom plans looked cheaper than the generic one: an empty lease array, a one-job
array), a third of a millisecond per batch, a quarter of the database's CPU per item. These
connections run only the statements of loom.jobs that are written for a generic plan
(``plan_cache_mode = force_generic_plan``) and never prepare anything on their own (psycopg's
``prepare_threshold`` out of reach), so nothing else gets a generic plan it was not written
for.

What the engine's pool gave a statement is kept: the connection is made from the engine's URL
and the dialect's connect arguments; one unused for longer than the engine's idle ping interval
(loom.db) is pinged first and replaced if dead; one that broke is closed and the next statement
gets a new one; a driver error is raised as SQLAlchemy's exception of the same kind
(OperationalError for an outage), as the callers' outage handling expects. ``engine.dispose()``
closes them.
"""

from __future__ import annotations

import os
import re
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import orjson
import psycopg
from sqlalchemy import Engine, event, exc
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import TextClause

from loom.db import idle_ping_seconds

# ``:name`` binds of a text() statement (not ``::type`` casts) -> psycopg's ``%(name)s``.
_BIND = re.compile(r"(?<![:\w]):(\w+)\b")
_OPTIONS = "-c plan_cache_mode=force_generic_plan"


def statement(sql: TextClause) -> str:
    """A text() statement in psycopg's parameter style (once, at import)."""
    raw = sql.text
    if "%" in raw:
        raise ValueError("a hot statement may not contain '%' (psycopg would read a placeholder)")
    return _BIND.sub(r"%(\1)s", raw)


def json_values(texts: list[str | None]) -> list[Any]:
    """json columns as the rows bring them (text), parsed in one call: ``json.loads`` per
    value cost fourteen times as much (its Python wrapper, then the stdlib's parser). NULL or
    '' -> {}."""
    return orjson.loads("[" + ",".join(t or "{}" for t in texts) + "]") if texts else []


class HotConnection:
    """One connection in autocommit: each ``execute`` is its own transaction."""

    def __init__(self, dbapi: psycopg.Connection[Any]) -> None:
        self.dbapi = dbapi
        self._cursor = dbapi.cursor()
        self.last_sql: str | None = None  # for the error, when one is raised
        self.used_at = time.monotonic()

    def execute(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run ``sql`` (from ``statement``) prepared on the server; all rows, as tuples."""
        self.last_sql = sql
        cur = self._cursor.execute(sql, params, prepare=True)
        return cur.fetchall() if cur.description is not None else []

    @property
    def broken(self) -> bool:
        return self.dbapi.closed or self.dbapi.broken


class _EngineConnections:
    """An engine's hot connections: one per thread that runs hot statements."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.pid = os.getpid()
        self.local = threading.local()
        self.lock = threading.Lock()
        self.open: set[HotConnection] = set()

    def connect(self) -> HotConnection:
        cargs, cparams = self.engine.dialect.create_connect_args(self.engine.url)
        options = " ".join(o for o in (cparams.pop("options", None), _OPTIONS) if o)
        dbapi = psycopg.connect(*cargs, **cparams, autocommit=True, options=options)
        # Never prepared on psycopg's own count (None would disable prepare=True too).
        dbapi.prepare_threshold = 2**31 - 1
        conn = HotConnection(dbapi)
        with self.lock:
            self.open.add(conn)
        return conn

    def drop(self, conn: HotConnection) -> None:
        with self.lock:
            self.open.discard(conn)
        if getattr(self.local, "conn", None) is conn:
            self.local.conn = None
        try:
            conn.dbapi.close()
        except psycopg.Error:
            pass

    def close_all(self) -> None:
        with self.lock:
            conns, self.open = list(self.open), set()
        for conn in conns:
            try:
                conn.dbapi.close()
            except psycopg.Error:
                pass
        self.local = threading.local()

    def get(self) -> HotConnection:
        """This thread's connection: alive as far as the idle ping can tell."""
        conn: HotConnection | None = getattr(self.local, "conn", None)
        if conn is not None and conn.broken:
            self.drop(conn)
            conn = None
        if conn is not None and time.monotonic() - conn.used_at > idle_ping_seconds(
                self.engine):
            try:
                conn.dbapi.execute("SELECT 1")
            except psycopg.Error:
                self.drop(conn)
                conn = None
        if conn is None:
            conn = self.local.conn = self.connect()
        return conn


_by_engine: weakref.WeakKeyDictionary[Engine, _EngineConnections] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def _connections(engine: Engine) -> _EngineConnections:
    with _registry_lock:
        found = _by_engine.get(engine)
        if found is not None and found.pid != os.getpid():
            # A forked child must not use (or close) its parent's sockets: start afresh and
            # let the parent's objects go without a word on the wire.
            found.open.clear()
            found = None
        if found is None:
            found = _by_engine[engine] = _EngineConnections(engine)
            event.listen(engine, "engine_disposed", lambda _e: found.close_all())
        return found


@contextmanager
def hot_connection(session: Session) -> Iterator[HotConnection]:
    """This thread's hot connection to the session's engine's database, for the length of the
    block. Anything the session had open is committed first, as loom.jobs functions do."""
    if session.in_transaction():
        session.commit()
    engine = session.get_bind()
    assert isinstance(engine, Engine), "the claim path runs on an engine-bound session"
    pool = _connections(engine)
    try:
        conn = pool.get()
    except psycopg.Error as e:  # the database is unreachable: an outage, as the pool says it
        raise exc.DBAPIError.instance(None, None, e, psycopg.Error,
                                      connection_invalidated=True) from e
    try:
        yield conn
    except psycopg.Error as e:
        broken = conn.broken
        if broken:
            pool.drop(conn)
        raise exc.DBAPIError.instance(conn.last_sql, None, e, psycopg.Error,
                                      connection_invalidated=broken) from e
    finally:
        conn.used_at = time.monotonic()
