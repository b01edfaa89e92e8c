"""A tenant's names for models brought by reference: ``loom models add NAME --backend openai
--ref SERVED@URL`` and then ``--model NAME``. A name is resolved when a job is submitted (the job
records the reference itself, and the name's params merged under its own), so renaming or
re-pointing a name never changes what a recorded job ran.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from loom import tasks
from loom.db import begin_write
from loom.errors import InvalidRequest, NotFound
from loom.jobs.registry import check_name
from loom.models import ModelAlias, utcnow

BACKENDS = {"hf": tasks.HF_PREFIX, "diffusers": tasks.DIFFUSERS_PREFIX,
            "openai": tasks.OPENAI_PREFIX}


def alias_ref(backend: str, ref: str) -> str:
    """``--backend hf --ref PATH`` -> ``hf:PATH`` (a ref that already names its backend is
    kept as it is)."""
    prefix = BACKENDS.get(backend)
    if prefix is None:
        raise InvalidRequest(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    full = ref if ref.startswith(prefix) else prefix + ref
    if tasks.backend_of(full) != prefix:
        raise InvalidRequest(f"ref: {ref!r} is not a {backend} reference")
    return full


def add_alias(session: Session, *, tenant_id: str, name: str, ref: str,
              params: dict[str, Any] | None = None) -> ModelAlias:
    """Name ``ref`` (replacing what the name meant before)."""
    check_name(name)
    begin_write(session)
    session.execute(delete(ModelAlias).where(ModelAlias.tenant_id == tenant_id,
                                             ModelAlias.name == name))
    row = ModelAlias(tenant_id=tenant_id, name=name, ref=ref, params=dict(params or {}),
                     created_at=utcnow())
    session.add(row)
    session.commit()
    return row


def remove_alias(session: Session, *, tenant_id: str, name: str) -> None:
    begin_write(session)
    n = session.execute(delete(ModelAlias).where(
        ModelAlias.tenant_id == tenant_id, ModelAlias.name == name)).rowcount  # type: ignore[attr-defined]
    session.commit()
    if not n:
        raise NotFound(f"no model named {name!r}")


def list_aliases(session: Session, *, tenant_id: str) -> list[ModelAlias]:
    rows = list(session.scalars(select(ModelAlias).where(ModelAlias.tenant_id == tenant_id)
                                .order_by(ModelAlias.name)))
    session.commit()
    return rows


def resolve_alias(session: Session, *, tenant_id: str, name: str,
                  params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(the model a job runs, its params): a tenant's name becomes its reference, the name's
    params under the job's own; any other name is returned as it is."""
    if name in tasks.BUILTIN_MODELS or tasks.backend_of(name):
        return name, params
    row = session.scalar(select(ModelAlias).where(ModelAlias.tenant_id == tenant_id,
                                                  ModelAlias.name == name))
    session.commit()
    if row is None:
        return name, params
    return row.ref, {**(row.params or {}), **params}
