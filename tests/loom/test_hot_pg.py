"""The claim path's connection handling (loom.jobs.hot_pg) on a real PostgreSQL: statements in
psycopg's style, each its own transaction, errors raised as SQLAlchemy's, and the connection
handed back to the pool as it came (a broken one replaced)."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import exc, text
from sqlalchemy.orm import Session, sessionmaker

from loom.db import make_engine, make_session_factory
from loom.jobs.hot_pg import hot_connection, statement


@pytest.fixture
def sessions(pg_url: str) -> Iterator[sessionmaker[Session]]:
    """A worker's engine: one pooled connection, pinged only after sitting idle a minute (so a
    connection killed under it fails its next statement instead of being replaced first)."""
    engine = make_engine(pg_url, pool_size=1, ping_idle_seconds=60.0)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


def test_statement_turns_binds_into_psycopg_placeholders_and_keeps_casts() -> None:
    sql = statement(text("SELECT CAST(:a AS int), :b::text, x FROM t WHERE y = :a"))
    assert sql == "SELECT CAST(%(a)s AS int), %(b)s::text, x FROM t WHERE y = %(a)s"
    with pytest.raises(ValueError, match="'%'"):
        statement(text("SELECT 1 WHERE x LIKE 'a%'"))


def test_each_statement_commits_and_the_pool_gets_a_transactional_connection_back(
    pg_url: str, sessions: sessionmaker[Session],
) -> None:
    with sessions() as session:
        session.execute(text("CREATE TABLE hot_t (v int)"))
        with hot_connection(session) as conn:
            assert conn.execute(statement(text("INSERT INTO hot_t VALUES (:v) RETURNING v")),
                                {"v": 1}) == [(1,)]
            assert conn.execute(statement(text("INSERT INTO hot_t VALUES (:v)")),
                                {"v": 2}) == []
        # The CREATE TABLE the session had open was committed first; the inserts were their
        # own transactions: another connection sees everything.
        with psycopg.connect(pg_url.replace("+psycopg", "")) as other:
            assert other.execute("SELECT count(*) FROM hot_t").fetchone() == (2,)
        # The same pooled connection is transactional again: a rollback undoes.
        session.execute(text("INSERT INTO hot_t VALUES (3)"))
        session.rollback()
        assert session.scalar(text("SELECT count(*) FROM hot_t")) == 2


def test_a_failed_statement_raises_sqlalchemys_error_and_leaves_the_connection_usable(
    sessions: sessionmaker[Session],
) -> None:
    with sessions() as session:
        with pytest.raises(exc.DataError, match="division by zero"), \
                hot_connection(session) as conn:
            conn.execute(statement(text("SELECT 1 / :zero")), {"zero": 0})
        with hot_connection(session) as conn:
            assert conn.execute(statement(text("SELECT :x + 1")), {"x": 1}) == [(2,)]


def test_a_connection_killed_under_it_raises_operational_error_and_is_replaced(
    pg_url: str, sessions: sessionmaker[Session],
) -> None:
    """What the worker's outage handling expects: sqlalchemy's OperationalError, and the next
    statement on a new connection."""
    pid_sql = statement(text("SELECT pg_backend_pid()"))
    with sessions() as session:
        with hot_connection(session) as conn:
            (first,), = conn.execute(pid_sql, {})
        with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (first,))
        with pytest.raises(exc.OperationalError) as raised, hot_connection(session) as conn:
            conn.execute(pid_sql, {})
        assert raised.value.connection_invalidated
        with hot_connection(session) as conn:
            (second,), = conn.execute(pid_sql, {})
        assert second != first
