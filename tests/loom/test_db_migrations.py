"""Migrations run on SQLite and PostgreSQL, up and down; SQLite connections get their pragmas."""

from __future__ import annotations

from sqlalchemy import inspect, text

from loom.db import downgrade, make_engine, upgrade
from loom.models import Base

TABLES = {t.name for t in Base.metadata.sorted_tables}


def test_upgrade_creates_every_table_and_downgrade_removes_them(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        names = set(inspect(engine).get_table_names())
        assert TABLES <= names
        assert "alembic_version" in names
        downgrade(db_url, "base")
        engine.dispose()
        assert not TABLES & set(inspect(engine).get_table_names())
        upgrade(db_url)  # and back up again: the downgrade left a clean slate
        engine.dispose()
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_models_match_migrations(db_url: str) -> None:
    """Autogenerate against the migrated DB finds nothing: models.py and 0001 agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_sqlite_pragmas(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30_000
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        engine.dispose()


def test_hot_claims_migration_keeps_the_leases_in_flight(db_url: str) -> None:
    """0015 turns the items running at upgrade time into lease rows (one per job and worker),
    so the reconciler still finds them; going down turns them back into 'claimed' events."""
    from datetime import datetime, timedelta

    downgrade(db_url, "0014")
    engine = make_engine(db_url)
    t0 = datetime(2026, 12, 1, 12, 0, 0)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tenants (id, name, created_at) "
                              "VALUES ('t', 't', :t)"), {"t": t0})
            conn.execute(text(
                "INSERT INTO jobs (id, tenant_id, task, model_name, params, status, priority, "
                "metadata, item_count, chunk_size, max_attempts, use_cache, created_at, "
                "updated_at) VALUES ('j', 't', 'caption', 'loom-shapes', '{}', 'running', 0, "
                "'{}', 3, 32, 3, true, :t, :t)"), {"t": t0})
            for i, (status, owner) in enumerate([("running", "w1"), ("running", "w1"),
                                                 ("queued", None)]):
                conn.execute(text(
                    "INSERT INTO items (job_id, \"index\", status, input, attempts, "
                    "attempts_excused, lease_owner, lease_expires_at, started_at, updated_at) "
                    "VALUES ('j', :i, :s, '{}', :a, 0, :o, :e, :st, :t)"),
                    {"i": i, "s": status, "a": 1 if owner else 0, "o": owner,
                     "e": t0 + timedelta(seconds=60 + i) if owner else None,
                     "st": t0 if owner else None, "t": t0})
        engine.dispose()
        upgrade(db_url)
        with engine.connect() as conn:
            leases = conn.execute(text(
                "SELECT job_id, tenant_id, worker_id, item_ids, expires_at FROM leases")).all()
            phases = conn.execute(text(
                "SELECT phase FROM items ORDER BY \"index\"")).scalars().all()
        assert len(leases) == 1
        job_id, tenant, worker, item_ids, expires = leases[0]
        if isinstance(item_ids, str):  # SQLite: a JSON list
            import json
            item_ids = json.loads(item_ids)
        assert (job_id, tenant, worker, sorted(item_ids)) == ("j", "t", "w1", [1, 2])
        assert expires == t0 + timedelta(seconds=61) or str(expires).startswith(
            str(t0 + timedelta(seconds=61)))
        assert phases == ["open", "open", "open"]
        engine.dispose()
        downgrade(db_url, "0014")
        with engine.connect() as conn:
            claimed = conn.execute(text(
                "SELECT item_id, attempt, worker_id FROM events WHERE kind = 'claimed' "
                "ORDER BY item_id")).all()
        assert [tuple(r) for r in claimed] == [(1, 1, "w1"), (2, 1, "w1")]
    finally:
        engine.dispose()
        upgrade(db_url)


def test_hot_claims_migration_leaves_room_on_the_items_pages(pg_url: str) -> None:
    """0015 gives the items table and the two indexes every item is in fillfactor 50 on
    PostgreSQL (a claim's HOT row version, a completion's index entry), and takes it back."""
    db_url = pg_url
    query = text("SELECT relname, reloptions FROM pg_class WHERE relname IN "
                 "('items', 'pk_items', 'uq_items_job_id_index') ORDER BY relname")
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            up = {name: opts for name, opts in conn.execute(query)}
        engine.dispose()
        downgrade(db_url, "0014")
        with engine.connect() as conn:
            down = {name: opts for name, opts in conn.execute(query)}
    finally:
        engine.dispose()
        upgrade(db_url)
    assert up == dict.fromkeys(("items", "pk_items", "uq_items_job_id_index"),
                               ["fillfactor=50"])
    assert down == dict.fromkeys(("items", "pk_items", "uq_items_job_id_index"), None)
