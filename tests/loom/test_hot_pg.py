"""The claim path's connection handling (loom.jobs.hot_pg) on a real PostgreSQL: statements in
psycopg's style, each its own transaction, on a connection of their own (generic plans, nothing
prepared behind their back), errors raised as SQLAlchemy's, a broken connection replaced, an
idle dead one replaced before it fails anything, all closed with the engine."""

from __future__ import annotations

import threading
import time
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


def test_hot_statements_get_generic_plans_and_nothing_else_is_prepared(
    sessions: sessionmaker[Session],
) -> None:
    """PostgreSQL would plan a statement whose custom plans look cheaper anew on every
    execution; the hot connection forces the generic plan, and prepares only what it is told."""
    sql = statement(text("SELECT count(*) FROM unnest(CAST(:ids AS bigint[])) AS u(id) "
                         "WHERE u.id = ANY(CAST(:keep AS bigint[]))"))
    with sessions() as session:
        for n in range(8):
            with hot_connection(session) as conn:
                assert conn.execute(sql, {"ids": list(range(n)), "keep": [1]}) == [
                    (1 if n > 1 else 0,)]
        with hot_connection(session) as conn:
            conn.dbapi.execute("SELECT 1")  # not prepared: no prepare_threshold
            conn.dbapi.execute("SELECT 1")
            plans = conn.dbapi.execute(
                "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements"
            ).fetchall()
    # (An empty list binds as another type: a statement of its own.)
    assert plans and all("unnest" in p[0] for p in plans)
    assert sum(p[1] for p in plans) == 8 and sum(p[2] for p in plans) == 0


def test_a_connection_that_died_while_idle_is_replaced_before_it_fails_a_statement(
    pg_url: str,
) -> None:
    """Idle longer than the engine's ping interval: pinged first, and a dead one replaced."""
    engine = make_engine(pg_url, pool_size=1, ping_idle_seconds=0.05)
    pid_sql = statement(text("SELECT pg_backend_pid()"))
    try:
        with make_session_factory(engine)() as session:
            with hot_connection(session) as conn:
                (first,), = conn.execute(pid_sql, {})
            with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (first,))
            time.sleep(0.1)
            with hot_connection(session) as conn:
                (second,), = conn.execute(pid_sql, {})
        assert second != first
    finally:
        engine.dispose()


def test_dispose_closes_the_hot_connections(pg_url: str) -> None:
    engine = make_engine(pg_url, pool_size=1, ping_idle_seconds=60.0)
    conns = []

    def use() -> None:
        with make_session_factory(engine)() as session, hot_connection(session) as conn:
            conn.execute(statement(text("SELECT 1")), {})
            conns.append(conn)

    use()
    worker = threading.Thread(target=use)  # another thread: a connection of its own
    worker.start()
    worker.join()
    assert len(conns) == 2 and conns[0] is not conns[1]
    engine.dispose()
    assert all(c.dbapi.closed for c in conns)
