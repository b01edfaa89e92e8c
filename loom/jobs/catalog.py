"""Model versions that workers have run (recorded once per process and model), read back by the
API's model list and by submit-time model checks."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from loom.db import begin_write
from loom.models import ModelVersion


def record_model_version(
    session: Session, *, name: str, version: str, weights_sha256: str, tasks: Sequence[str]
) -> None:
    """Insert the version unless it is known; a concurrent insert by another process is fine."""
    # A write transaction from the start: on SQLite a read-then-write transaction fails at once
    # ("database is locked", no busy wait) while another thread or process holds the write lock.
    begin_write(session)
    exists = session.scalar(
        select(ModelVersion.id).where(
            ModelVersion.name == name,
            ModelVersion.version == version,
            ModelVersion.weights_sha256 == weights_sha256,
        )
    )
    if exists is not None:
        session.rollback()
        return
    session.add(ModelVersion(name=name, version=version, weights_sha256=weights_sha256,
                             tasks=list(tasks)))
    try:
        session.commit()
    except IntegrityError:  # another process recorded it first (unique constraint)
        session.rollback()


def model_versions(session: Session) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.created_at)))
