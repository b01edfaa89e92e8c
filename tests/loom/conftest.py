"""Fixtures for the loom core tests: a session factory on db_url and a job factory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from loom import jobs, tenants
from loom.models import Job


@pytest.fixture
def session(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    with session_factory() as s:
        yield s


@pytest.fixture
def tenant_id(session: Session) -> str:
    return tenants.ensure_tenant(session, name=tenants.DEFAULT_TENANT).id


@pytest.fixture
def make_job(session: Session, tenant_id: str) -> Callable[..., Job]:
    """submit_job with small defaults: make_job(n_items, chunk_size=4, max_attempts=3, ...)."""

    def factory(n: int = 8, **kwargs: Any) -> Job:
        values: dict[str, Any] = {
            "tenant_id": tenant_id,
            "task": "caption",
            "model_name": "loom-shapes",
            "items": [{"input": {"image_key": f"k/{i}.png"}, "metadata": {"file": f"{i}.png"}}
                      for i in range(n)],
            "chunk_size": 4,
            "max_attempts": 3,
        }
        values.update(kwargs)
        return jobs.submit_job(session, **values)

    return factory
