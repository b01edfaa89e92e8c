"""Submitting a finetune job over the API: a rows manifest uploaded through the Files API becomes
a one-item finetune job (loom.finetune), checked before anything is recorded."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy.orm import Session

from api.deps import Runtime
from api.service import publish, stream_lines
from loom import finetune, jobs, tasks
from loom.errors import InvalidRequest, NotFound
from loom.models import Job, new_id

MAX_ROWS = 100_000  # rows are held in a worker's memory while it trains (12 KB each)


def check_rows(chunks: Iterable[bytes], *, tenant_id: str) -> tuple[int, str]:
    """(rows, sha256) of a rows manifest read as it streams in, refusing a line that is not a
    labelled row of this tenant's images (``image_key`` from POST /v1/files)."""
    digest = hashlib.sha256()

    def hashed() -> Iterator[bytes]:
        for chunk in chunks:
            digest.update(chunk)
            yield chunk

    n = 0
    for i, line in enumerate(stream_lines(hashed()), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InvalidRequest(f"rows line {i}: not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise InvalidRequest(f"rows line {i}: expected an object")
        key = row.get("image_key")
        if not isinstance(key, str) or not key.startswith(f"{tenant_id}/"):
            raise InvalidRequest(f"rows line {i}: image_key must name one of your uploaded "
                                 "images (the key POST /v1/files returned)")
        labels = {k: row.get(k) for k in ("caption", "question", "answer")}
        if any(v is not None and not isinstance(v, str) for v in labels.values()):
            raise InvalidRequest(f"rows line {i}: caption, question and answer are strings")
        if not labels["caption"] and not (labels["question"] and labels["answer"]):
            raise InvalidRequest(f"rows line {i}: needs a caption, or a question and an answer")
        n += 1
        if n > MAX_ROWS:
            raise InvalidRequest(f"rows: more than {MAX_ROWS} rows")
    if n == 0:
        raise InvalidRequest("rows: the manifest has no rows")
    return n, digest.hexdigest()


def submit_finetune(session: Session, rt: Runtime, *, tenant_id: str, rows_key: str, name: str,
                    base: str, hyper: dict[str, Any], val_fraction: float) -> Job:
    """Check the rows, the name, the base and the hyperparameters, then record the job."""
    from loom.jobs.registry import check_name

    check_name(name)  # the cheap checks first: nothing is read for a request that cannot run
    finetune.check_hyper(hyper)
    if not 0 <= val_fraction < 0.5:
        raise InvalidRequest(f"val_fraction: must be in [0, 0.5), got {val_fraction}")
    if not rows_key.startswith(f"{tenant_id}/"):
        raise NotFound(f"rows_key: no file {rows_key!r} in your storage")
    if base not in tasks.BUILTIN_MODELS:
        found = jobs.resolve_model(session, tenant_id=tenant_id, ref=base)
        if found is None:
            raise InvalidRequest(f"base: unknown model {base!r} (loom-shapes, or one of your "
                                 "registered models: GET /v1/models)")
        base = found.ref  # pinned: a later version does not change what this job trains from
    if not rt.store.exists(rows_key):
        raise NotFound(f"rows_key: no file {rows_key!r} in your storage")
    count, sha = check_rows(rt.store.open_stream(rows_key), tenant_id=tenant_id)
    item = finetune.check_input({
        "rows_key": rows_key, "rows_sha256": sha, "rows": count, "name": name, "base": base,
        "hyper": hyper, "val_fraction": val_fraction})
    job = jobs.submit_job(session, job_id=new_id(), tenant_id=tenant_id, task=finetune.TASK,
                          model_name=base, items=[{"input": item}], chunk_size=1,
                          max_attempts=rt.settings.max_attempts, use_cache=False)
    publish(session, rt, job.id)
    return job
