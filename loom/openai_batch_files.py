"""A batch's output and error files, written from its jobs' item rows once they are finished.

Each input line is one or more consecutive items of one job (``metadata.line``: an embeddings
line with 3 inputs is 3 items, an images line with ``n`` = 2 is 2). The lines come out merged in
input order from every job of the batch and from the lines refused at validation (stored as one
JSONL object when the batch was created): a line whose items all succeeded goes to the output
file, any other to the error file. Items finish exactly once (fenced completion), so each line
is written exactly once, whatever happened to the workers.

Written idempotently: the bytes are a function of the finished rows (ids come from item ids,
``created`` from their finish times), the file ids are derived from the batch id, the objects
overwrite themselves and ``files.record_file`` inserts each row once. Two writers (the API
answering a poll, a worker's reconciler) write the same files.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from sqlalchemy.orm import Session

from loom import files, jobs, openai_replies, storage
from loom.models import Batch

PAGE = 256  # rows whose vectors / images are read from the store together
_NO_LIMIT = 2**62


@dataclass(frozen=True)
class Written:
    output_file_id: str | None
    error_file_id: str | None
    completed: int  # lines in the output file
    failed: int  # lines in the error file


def invalid_key(tenant_id: str, batch_id: str) -> str:
    """Where a batch keeps the error lines of the lines refused at validation."""
    return storage.validate_key(f"{tenant_id}/batches/{batch_id}/invalid.jsonl")


def invalid_record(batch_id: str, *, line: int, custom_id: Any, code: str,
                   message: str) -> dict[str, Any]:
    """The error-file line of an input line refused at validation (``line`` kept for the
    merge; it is not part of what the error file shows)."""
    return {"line": line, "record": {
        "id": f"batch_req_{batch_id.removeprefix('batch_')}_{line}",
        "custom_id": custom_id if isinstance(custom_id, str) else None,
        "response": None, "error": {"code": code, "message": message}}}


def file_id(batch_id: str, kind: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:32]


def write(session: Session, store: storage.Store, batch: Batch) -> Written:
    """Write the batch's output and error files (each only when it has a line)."""
    counts = {True: 0, False: 0}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        for _, ok, record in _lines(session, store, batch):
            (out if ok else err).write(json.dumps(record, separators=(",", ":"),
                                                  ensure_ascii=False).encode() + b"\n")
            counts[ok] += 1
        out_id = _put(session, store, batch, "output", out) if counts[True] else None
        err_id = _put(session, store, batch, "error", err) if counts[False] else None
    return Written(out_id, err_id, completed=counts[True], failed=counts[False])


def _put(session: Session, store: storage.Store, batch: Batch, kind: str, f: IO[bytes]) -> str:
    fid = file_id(batch.id, kind)
    key = storage.file_key(batch.tenant_id, fid, "jsonl")
    size, sha256, _ = files.measure(f, max_bytes=_NO_LIMIT)
    store.put_stream(key, f, "application/jsonl")
    files.record_file(session, file_id=fid, tenant_id=batch.tenant_id,
                      filename=f"{batch.id}_{kind}.jsonl", purpose="batch_output",
                      storage_key=key, size_bytes=size, sha256=sha256,
                      content_type="application/jsonl")
    return fid


def _lines(session: Session, store: storage.Store,
           batch: Batch) -> Iterator[tuple[int, bool, dict[str, Any]]]:
    """(line, goes to the output file, record) in input order."""
    streams: list[Iterable[tuple[int, bool, dict[str, Any]]]] = [
        _job_lines(session, store, batch, job_id) for job_id in batch.job_ids or []]
    if batch.invalid_key:
        streams.append(_invalid_lines(store, batch.invalid_key))
    return heapq.merge(*streams, key=lambda entry: entry[0])


def _invalid_lines(store: storage.Store, key: str) -> Iterator[tuple[int, bool, dict[str, Any]]]:
    for raw in store.get(key).splitlines():
        if raw.strip():
            entry = json.loads(raw)
            yield int(entry["line"]), False, entry["record"]


def _job_lines(session: Session, store: storage.Store, batch: Batch,
               job_id: str) -> Iterator[tuple[int, bool, dict[str, Any]]]:
    results = _results(jobs.iter_results(session, job_id=job_id), store)
    for line, group in itertools.groupby(results, key=lambda r: int(r.metadata["line"])):
        ok, record = line_record(batch, list(group))
        yield line, ok, record


def _results(rows: Iterable[tuple[Any, Any]],
             store: storage.Store) -> Iterator[openai_replies.Result]:
    source = iter(rows)
    while page := list(itertools.islice(source, PAGE)):
        yield from openai_replies.load_results(page, store)


def line_record(batch: Batch,
                results: Sequence[openai_replies.Result]) -> tuple[bool, dict[str, Any]]:
    """(succeeded, the output or error file line) of one input line's items."""
    first = results[0]
    rid = str(first.item_id)
    base = {"id": f"batch_req_{rid}", "custom_id": first.metadata.get("custom_id")}
    if any(r.status == "cancelled" for r in results):
        code, message = (
            ("batch_expired", ("This request could not be executed before the completion "
                               "window expired.")) if batch.expired_at else
            ("batch_cancelled", ("This request was not executed: the batch (or its Loom job) "
                                 "was cancelled.")))
        return False, {**base, "response": None, "error": {"code": code, "message": message}}
    status, body = openai_replies.reply(batch.endpoint, results, reply_id=rid)
    return status == 200, {**base, "response": {"status_code": status,
                                                "request_id": f"req_{rid}", "body": body},
                           "error": None}
