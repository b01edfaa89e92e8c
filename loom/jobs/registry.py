"""The model registry: versions a tenant trained with a finetune job, run by name.

A name belongs to one tenant: another tenant neither sees it nor can run it. ``NAME`` means the
latest version, ``NAME@vN`` a given one. Registration is once per finetune job (a retried
attempt that finished again gets the version the first one registered).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from loom import tasks
from loom.db import begin_write
from loom.errors import InvalidRequest
from loom.models import RegisteredModel

FINETUNED_TASKS = ("caption", "vqa")  # pipeline.registry.FINETUNED_TASKS (a test keeps them equal)
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_REF_RE = re.compile(r"^(?P<name>[^@]+)@v(?P<version>[0-9]+)$")


def check_name(name: str) -> str:
    """A name a finetune job may register: lower-case letters, digits, '.', '_', '-' (at most 64),
    not a built-in model's and not an ``hf:`` reference."""
    if name in tasks.BUILTIN_MODELS or tasks.backend_of(name) is not None:
        raise InvalidRequest(f"name: {name!r} is a built-in model's name; choose another")
    if not NAME_RE.match(name):
        raise InvalidRequest(f"name: {name!r} is not a model name (lower-case letters, digits, "
                             "'.', '_' or '-', at most 64, starting with a letter or digit)")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` -> (NAME, None: the latest), ``NAME@vN`` -> (NAME, N)."""
    m = _REF_RE.match(ref)
    return (m["name"], int(m["version"])) if m else (ref, None)


def resolve_model(session: Session, *, tenant_id: str, ref: str) -> RegisteredModel | None:
    """The tenant's registered model ``ref`` names, or None (also for another tenant's)."""
    name, version = parse_ref(ref)
    q = select(RegisteredModel).where(RegisteredModel.tenant_id == tenant_id,
                                      RegisteredModel.name == name)
    if version is not None:
        q = q.where(RegisteredModel.version == version)
    return session.scalars(q.order_by(RegisteredModel.version.desc()).limit(1)).first()


def registered_for_job(session: Session, *, job_id: str) -> RegisteredModel | None:
    """The version a finetune job registered, or None (not finished, or it failed)."""
    return session.scalars(
        select(RegisteredModel).where(RegisteredModel.job_id == job_id)).first()


def registered_models(session: Session, *, tenant_id: str) -> list[RegisteredModel]:
    return list(session.scalars(
        select(RegisteredModel).where(RegisteredModel.tenant_id == tenant_id)
        .order_by(RegisteredModel.name, RegisteredModel.version)))


def registered_caps(session: Session, *, tenant_id: str, ref: str) -> tasks.ModelCaps | None:
    """What a registered model serves: caption and vqa (pipeline.registry.FINETUNED_TASKS), with
    the base's parameters. Not generate (labelled rows teach no layouts, so a new word would be
    drawn as something else) and not embed (the embedding head is the base's)."""
    found = resolve_model(session, tenant_id=tenant_id, ref=ref)
    if found is None:
        return None
    base = tasks.BUILTIN_MODELS.get("loom-shapes")
    assert base is not None
    return tasks.ModelCaps(tasks=FINETUNED_TASKS, params=base.params)


@dataclass(frozen=True)
class Trained:
    """What a finished finetune attempt hands to ``register_model``."""

    name: str
    base_model: str
    base_weights_sha256: str
    weights_key: str
    weights_sha256: str
    size_bytes: int
    training_sha256: str
    training_rows: int
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any]


def register_model(session: Session, *, tenant_id: str, job_id: str,
                   trained: Trained) -> RegisteredModel:
    """Register ``trained`` as the next version of its name for the tenant; once per job."""
    for _ in range(5):  # two jobs registering the same name at once: the loser takes the next
        begin_write(session)
        existing = registered_for_job(session, job_id=job_id)
        if existing is not None:
            session.commit()
            return existing
        latest = session.scalar(select(func.max(RegisteredModel.version)).where(
            RegisteredModel.tenant_id == tenant_id, RegisteredModel.name == trained.name))
        row = RegisteredModel(tenant_id=tenant_id, job_id=job_id, version=int(latest or 0) + 1,
                              **trained.__dict__)
        session.add(row)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            continue
        return row
    raise RuntimeError(f"could not register {trained.name!r}: versions kept colliding")


def model_dict(m: RegisteredModel) -> dict[str, Any]:
    """A registered model as the CLI and the lineage show it."""
    return {"name": m.name, "version": m.version, "ref": m.ref, "base_model": m.base_model,
            "base_weights_sha256": m.base_weights_sha256, "weights_sha256": m.weights_sha256,
            "size_bytes": m.size_bytes, "training_sha256": m.training_sha256,
            "training_rows": m.training_rows, "hyperparameters": m.hyperparameters,
            "metrics": m.metrics, "finetune_job_id": m.job_id,
            "created_at": m.created_at.isoformat() + "Z" if m.created_at else None}
