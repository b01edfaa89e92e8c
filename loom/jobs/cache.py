"""The result cache: an output is reused, with no inference, for a later item that asks the
same thing of the same weights. The key covers the tenant (no reuse across tenants), the task,
the model name and weights sha256 (new weights invalidate everything), the params the model
sees, the input's content sha256 with the item's text inputs (a question asked of an image is
part of what is asked), and the seed of seeded tasks."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from loom.models import Job, Output


def cache_key(*, tenant_id: str, task: str, model_name: str, weights_sha256: str,
              params: Mapping[str, Any], input_sha256: str, texts: Mapping[str, str],
              seed: int | None) -> str:
    raw = json.dumps([tenant_id, task, model_name, weights_sha256, dict(params), input_sha256,
                      dict(texts), seed], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode()).hexdigest()


def cached_outputs(session: Session, *, keys: Iterable[str]) -> dict[str, Output]:
    """The earliest output recorded for each key (an original, not itself a reuse)."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    found: dict[str, Output] = {}
    for row in session.scalars(
        select(Output).where(Output.cache_key.in_(wanted), Output.cached_from.is_(None))
        .order_by(Output.id)
    ):
        found.setdefault(row.cache_key or "", row)
    for row in found.values():
        session.expunge(row)
    return found


def job_uses_cache(session: Session, *, job_id: str) -> bool:
    return bool(session.scalar(select(Job.use_cache).where(Job.id == job_id)))
