"""Uploaded files (the Files API, in the manner of OpenAI's): a manifest of any size, a dataset
table, or an image, stored under a server-generated key ``{tenant}/files/{file_id}.{ext}``.

The key of a ``manifest`` file is what ``POST /v1/jobs`` takes as ``manifest_key``; an ``image``
file's key can be an item's ``image_key``. Every function is tenant-scoped: another tenant's file
is NotFound.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import datetime, timezone
from typing import Any, BinaryIO

from sqlalchemy import and_, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from loom import storage
from loom.errors import InvalidRequest, NotFound, PayloadTooLarge
from loom.jobs.types import Page, decode_cursor, encode_cursor
from loom.models import File, utcnow

# batch: an OpenAI-compatible batch input file; batch_output: a batch's output or error file,
# written by Loom (loom/openai_batches.py).
PURPOSES = ("manifest", "dataset", "image", "batch", "batch_output")
MAX_PAGE = 1000
_EXT = re.compile(r"^[a-z0-9]{1,10}$")
_HASH_BLOCK = 1024 * 1024


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def safe_ext(filename: str, purpose: str) -> str:
    """The key's extension: the file name's (when plain, e.g. jsonl, parquet, tar), else bin."""
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    if _EXT.match(ext):
        return ext
    return "jsonl" if purpose == "manifest" else "bin"


def check_purpose(purpose: str) -> str:
    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose: one of {', '.join(PURPOSES)} (got {purpose[:50]!r})")
    return purpose


def measure(f: BinaryIO, *, max_bytes: int) -> tuple[int, str, bytes]:
    """Size, sha256 and first bytes of a seekable file object, read in blocks (memory flat);
    leaves it at position 0. PayloadTooLarge past ``max_bytes``."""
    f.seek(0)
    digest = hashlib.sha256()
    size = 0
    head = b""
    while block := f.read(_HASH_BLOCK):
        if not head:
            head = block[:64]
        size += len(block)
        if size > max_bytes:
            raise PayloadTooLarge(f"file larger than {max_bytes} bytes (LOOM_MAX_FILE_BYTES)")
        digest.update(block)
    f.seek(0)
    return size, digest.hexdigest(), head


def store_file(
    session: Session,
    store: storage.Store,
    *,
    tenant_id: str,
    f: BinaryIO,
    filename: str,
    purpose: str,
    content_type: str | None,
    max_bytes: int,
) -> File:
    """Hash ``f`` (seekable: the API's spooled upload), stream it into the store, record it.
    The row is written only after the object is stored, so a listed file always exists."""
    from loom import media
    from loom.errors import InvalidInput

    check_purpose(purpose)
    name = (filename or "upload").replace("\\", "/").rsplit("/", 1)[-1][:255] or "upload"
    size, sha256, head = measure(f, max_bytes=max_bytes)
    if size == 0:
        raise InvalidRequest("file: empty")
    if purpose == "image":
        try:
            media.image_format(head)
        except InvalidInput as exc:
            raise InvalidRequest(f"file: {exc.message}") from None
    file_id = new_file_id()
    key = storage.file_key(tenant_id, file_id, safe_ext(name, purpose))
    store.put_stream(key, f, content_type or "application/octet-stream")
    row = File(
        id=file_id, tenant_id=tenant_id, filename=name, purpose=purpose, storage_key=key,
        size_bytes=size, sha256=sha256, content_type=(content_type or None) and content_type[:100],
        created_at=utcnow(),
    )
    session.add(row)
    session.commit()
    return row


def record_file(
    session: Session, *, file_id: str, tenant_id: str, filename: str, purpose: str,
    storage_key: str, size_bytes: int, sha256: str, content_type: str,
) -> File:
    """The row of a file Loom wrote itself under a deterministic id (a batch's output file),
    made once: a second writer of the same file finds the first one's row."""
    check_purpose(purpose)
    row = session.get(File, file_id)
    if row is not None:
        return row
    row = File(id=file_id, tenant_id=tenant_id, filename=filename, purpose=purpose,
               storage_key=storage_key, size_bytes=size_bytes, sha256=sha256,
               content_type=content_type, created_at=utcnow())
    session.add(row)
    try:
        session.commit()
    except IntegrityError:  # the other writer inserted it first: the same file
        session.rollback()
        row = session.get(File, file_id)
        if row is None:
            raise
    return row


def get_file(session: Session, *, file_id: str, tenant_id: str) -> File:
    row = session.get(File, file_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no file {file_id[:100]}")
    return row


def sha256_of_key(session: Session, *, tenant_id: str, key: str) -> str | None:
    """The sha256 of the uploaded file stored under ``key``, or None when no file row has it
    (an object put into the bucket some other way)."""
    return session.scalar(select(File.sha256).where(File.tenant_id == tenant_id,
                                                    File.storage_key == key).limit(1))


def list_files(
    session: Session,
    *,
    tenant_id: str,
    purpose: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page[File]:
    """Newest first; keyset pagination on (created_at, id)."""
    limit = max(1, min(limit, MAX_PAGE))
    stmt = select(File).where(File.tenant_id == tenant_id)
    if purpose is not None:
        stmt = stmt.where(File.purpose == purpose)
    if cursor is not None:
        created_raw, last_id = decode_cursor(cursor, 2)
        try:
            created = datetime.fromisoformat(str(created_raw))
        except ValueError:
            raise InvalidRequest("invalid pagination cursor") from None
        stmt = stmt.where(or_(File.created_at < created,
                              and_(File.created_at == created, File.id < str(last_id))))
    rows = list(session.scalars(
        stmt.order_by(File.created_at.desc(), File.id.desc()).limit(limit + 1)))
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor([rows[-1].created_at, rows[-1].id])
    return Page(items=rows, next_cursor=next_cursor)


def delete_file(session: Session, store: storage.Store, *, file_id: str, tenant_id: str) -> File:
    """Remove the row, then the object (a crash in between leaves an unlisted object, never a
    listed file without bytes). Jobs that already read a manifest are unaffected."""
    row = get_file(session, file_id=file_id, tenant_id=tenant_id)
    session.delete(row)
    session.commit()
    store.delete(row.storage_key)
    return row


def file_dict(row: File) -> dict[str, Any]:
    """The API shape (OpenAI's file object + ``sha256`` and the storage ``key``)."""
    created = row.created_at
    return {
        "id": row.id, "object": "file", "bytes": row.size_bytes,
        "created_at": int(created.replace(tzinfo=timezone.utc).timestamp()) if created else None,
        "filename": row.filename, "purpose": row.purpose, "sha256": row.sha256,
        "key": row.storage_key, "content_type": row.content_type,
    }
