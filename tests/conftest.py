"""Shared fixtures: real PostgreSQL, Redis and S3 (moto_server), plus a settings factory.

Locally a missing service skips the tests that need it; under CI=true it FAILS them, so a broken
CI environment can never turn into a green run of skipped tests.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

PG_HOST = os.environ.get("LOOM_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("LOOM_TEST_PG_PORT", "5432"))
PG_USERS = tuple(os.environ.get("LOOM_TEST_PG_USERS", "root,postgres").split(","))
REDIS_TEST_URL = os.environ.get("LOOM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

# Fake credentials for moto; set at import so that no test can reach real AWS by accident.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)


def _missing(what: str) -> None:
    """Skip locally, fail in CI: a service that CI promised must be there."""
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"{what} is required under CI=true but is unavailable", pytrace=False)
    pytest.skip(f"{what} unavailable")


# --- PostgreSQL --------------------------------------------------------------------------------


def _pg_admin_connect() -> Any:
    """An autocommit psycopg connection to the maintenance DB, or None when PG is unreachable."""
    import psycopg

    for user in PG_USERS:
        try:
            return psycopg.connect(
                host=PG_HOST, port=PG_PORT, user=user, dbname="postgres",
                autocommit=True, connect_timeout=3,
            )
        except psycopg.OperationalError:
            continue
    return None


def _create_pg_database() -> tuple[str, str]:
    conn = _pg_admin_connect()
    if conn is None:
        _missing(f"PostgreSQL at {PG_HOST}:{PG_PORT}")
    name = f"loom_t_{secrets.token_hex(6)}"
    with conn:
        user = conn.info.user
        conn.execute(f'CREATE DATABASE "{name}"')
        # Test data need not survive a power cut; not waiting for the WAL flush on every
        # commit makes commit-heavy tests several times faster.
        conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    return name, f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{name}"


def _drop_pg_database(name: str) -> None:
    conn = _pg_admin_connect()
    if conn is None:
        return
    with conn:
        # Leftover pooled connections (a test that forgot dispose()) would block DROP DATABASE.
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def _reset_pg_database(name: str, url: str) -> None:
    """Empty every table (fast, unlike CREATE/DROP DATABASE) so each test starts clean."""
    import psycopg

    from loom.db import upgrade

    user = url.split("://", 1)[1].split("@", 1)[0]
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname=name,
                         autocommit=True) as conn:
        # Connections a previous test left open (pooled, idle in transaction) would block
        # TRUNCATE; pool_pre_ping lets their engines reconnect transparently.
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename <> 'alembic_version'")]
        if "items" not in tables:  # a test downgraded the schema: bring it back
            upgrade(url)
            return
        conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables)
                     + " RESTART IDENTITY CASCADE")


@pytest.fixture(scope="module")
def pg_url_module() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one test module; dropped afterwards."""
    from loom.db import upgrade

    name, url = _create_pg_database()
    try:
        upgrade(url)
        yield url
    finally:
        _drop_pg_database(name)


@pytest.fixture
def pg_url(pg_url_module: str) -> str:
    """The module's PostgreSQL database, emptied for this test (tests start clean).

    One database per module (CREATE/DROP DATABASE cost seconds each); every table is truncated
    before each test, so a test sees exactly what it created. Connections to it left from the
    previous test are terminated, so do not combine pg_url (or db_url) with a module-long
    service on pg_url_module in the same test module.
    """
    _reset_pg_database(pg_url_module.rsplit("/", 1)[1], pg_url_module)
    return pg_url_module


# --- SQLite ------------------------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh, migrated SQLite file."""
    from loom.db import upgrade

    url = f"sqlite:///{tmp_path / 'loom.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Runs the test once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def engine(db_url: str) -> Iterator[Any]:
    """An engine on db_url, disposed afterwards (no ResourceWarning, no blocked DROP DATABASE)."""
    from loom.db import make_engine

    eng = make_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def session_factory(engine: Any) -> Any:
    from loom.db import make_session_factory

    return make_session_factory(engine)


# --- Redis -------------------------------------------------------------------------------------


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database flushed before the test."""
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=2)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError:
        client.close()
        _missing(f"Redis at {REDIS_TEST_URL}")
    try:
        yield REDIS_TEST_URL
    finally:
        client.close()


# --- S3 (moto_server) --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _moto_server_bin() -> str | None:
    candidate = Path(sys.executable).parent / "moto_server"
    if candidate.exists():
        return str(candidate)
    return shutil.which("moto_server")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The S3 endpoint: the one .ci/run started (LOOM_TEST_S3_ENDPOINT), else a moto_server
    subprocess of this session's own; its URL."""
    import httpx

    external = os.environ.get("LOOM_TEST_S3_ENDPOINT")
    if external:
        try:
            httpx.get(f"{external}/moto-api/", timeout=5.0)
        except httpx.HTTPError:
            _missing(f"the S3 endpoint LOOM_TEST_S3_ENDPOINT={external}")
        yield external
        return
    binary = _moto_server_bin()
    if binary is None:
        _missing("moto_server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/moto-api/", timeout=1.0)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    _missing(f"moto_server (did not start on {url})")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[str]:
    """A fresh bucket per test: yields ``s3://<bucket>/<prefix>``."""
    import boto3

    bucket = f"loom-t-{secrets.token_hex(6)}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    try:
        client.create_bucket(Bucket=bucket)
        yield f"s3://{bucket}/test"
    finally:
        client.close()


# --- Settings ----------------------------------------------------------------------------------


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Any]:
    """Settings factory: LOOM_HOME under tmp_path, auth off; keyword overrides win."""
    from loom.config import Settings

    def factory(**overrides: Any) -> Any:
        values: dict[str, Any] = {"home": tmp_path / "loom-home", "auth": "off"}
        values.update(overrides)
        return Settings(**values)

    return factory
