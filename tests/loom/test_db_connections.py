"""PostgreSQL connections that die in the pool: replaced before use (pinged on checkout), or, in
a worker's engine (``ping_idle_seconds``), pinged only after sitting idle."""

from __future__ import annotations

import time

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from loom.db import make_engine


def _terminate(url: str, pid: int) -> None:
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def _backend_pid(engine: object) -> int:
    with engine.connect() as conn:  # type: ignore[attr-defined]
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


@pytest.mark.parametrize("ping_idle_seconds", [None, 0.2])
def test_a_connection_killed_while_idle_is_replaced_before_use(
    pg_url: str, ping_idle_seconds: float | None
) -> None:
    engine = make_engine(pg_url, pool_size=1, ping_idle_seconds=ping_idle_seconds)
    try:
        first = _backend_pid(engine)
        _terminate(pg_url, first)
        time.sleep(0.3)  # past the idle time: the checkout pings, finds it dead, reconnects
        assert _backend_pid(engine) != first
    finally:
        engine.dispose()


def test_a_worker_engine_does_not_ping_a_connection_used_moments_ago(pg_url: str) -> None:
    """The hot path pays no ping: a connection killed right after use fails its next statement
    (the caller's outage handling retries), and that failure invalidates the pool, so the
    statement after it gets a new connection."""
    engine = make_engine(pg_url, pool_size=1, ping_idle_seconds=60.0)
    try:
        first = _backend_pid(engine)
        _terminate(pg_url, first)
        with pytest.raises(OperationalError):
            _backend_pid(engine)
        assert _backend_pid(engine) != first
    finally:
        engine.dispose()
