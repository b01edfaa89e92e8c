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
