"""Value types passed across the loom.jobs API, and small helpers shared by its modules."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, and_, insert, literal_column
from sqlalchemy.orm import Session

from loom.errors import InvalidRequest, LoomError
from loom.models import Event, Item, ItemStatus, JobStatus, utcnow

T = TypeVar("T")

# Items that still need work; a job is finalised when it has none.
OPEN_ITEM = (ItemStatus.queued.value, ItemStatus.running.value)
# The same test in the column the indexes read (loom.models.ITEM_PHASE), spelled as
# ix_items_open's predicate is: SQLite uses a partial index only for the very same terms.
OPEN_ITEM_PHASE = Item.phase.in_([literal_column("'open'"), literal_column("'retry'")])


def status_is(status: str) -> ColumnElement[bool]:
    """``Item.status == status`` with the phase term that lets an index of items serve it."""
    phase = (OPEN_ITEM_PHASE if status in OPEN_ITEM
             else Item.phase == literal_column(f"'{ItemStatus(status).value}'"))
    return and_(phase, Item.status == status)
# Job states from which finalisation may start (the conditional UPDATE's guard).
OPEN_JOB = (JobStatus.queued.value, JobStatus.running.value, JobStatus.cancelling.value)
# Job states in which workers may claim items.
CLAIMABLE_JOB = (JobStatus.queued.value, JobStatus.running.value)
# Cap on the retry backoff so that a long-failing item is still retried within the hour.
MAX_BACKOFF_SECONDS = 3600.0


@dataclass(frozen=True)
class Chunk:
    """One broker message: items [start, end) of a job."""

    job_id: str
    start: int
    end: int  # exclusive
    priority: int = 0


# Not frozen, though nothing changes one (dataclasses.replace makes a new one): a frozen
# dataclass's __init__ costs three times as much, and a claim builds one per item. (Frozen, it
# was not hashable either: its dict fields.)
@dataclass
class ClaimedItem:
    id: int
    job_id: str
    tenant_id: str
    index: int
    task: str
    model_name: str
    params: dict[str, Any]
    input: dict[str, Any]
    attempts: int  # including this claim: pass it back as ItemResult/ItemFailure.attempt
    # The item's metadata (its dataset row), read only for jobs whose prompt template needs it
    # (jobs.items_metadata): claims do not carry it.
    metadata: dict[str, Any] | None = None
    # The lease row of the claim that took it (loom.models.Lease): the completion of the last
    # of its items ends it (complete_items' end_leases).
    lease_id: int | None = None


@dataclass
class ItemResult:
    item_id: int
    kind: str  # "text" | "image"
    text: str | None = None
    storage_key: str | None = None
    content_type: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    input_sha256: str | None = None
    model_name: str | None = None  # None: the job's model_name
    model_version: str = "unknown"
    weights_sha256: str = ""
    seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cache_key: str | None = None  # what this output answers (loom.jobs.cache)
    cached_from: int | None = None  # the output reused instead of inferring
    details: dict[str, Any] | None = None  # the backend's word on this output (Output.details)
    # The claim's attempt number (ClaimedItem.attempts). When given, the fence also checks it,
    # so a stale result from an earlier claim by the same worker id is rejected too.
    attempt: int | None = field(default=None, kw_only=True)


@dataclass
class ItemFailure:
    item_id: int
    error: LoomError
    attempt: int | None = field(default=None, kw_only=True)


@dataclass
class ReconcileReport:
    published: int = 0  # outbox rows published for the first time (or after a retry)
    republished: int = 0  # stale chunks published again
    requeued: int = 0  # expired leases under the attempt cap
    failed: int = 0  # expired leases at the cap -> failed worker_lost
    cancelled: int = 0  # expired leases in cancelling jobs
    finalized: int = 0  # jobs finalised by the reconciler (missed or interrupted finalisation)


@dataclass
class JobProgress:
    job_id: str
    status: str
    total: int
    counts: dict[str, int]
    done: int
    items_per_second: float | None
    eta_seconds: float | None

    def count(self, status: ItemStatus | str) -> int:
        key = status.value if isinstance(status, ItemStatus) else status
        return self.counts.get(key, 0)


@dataclass
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None  # opaque; None on the last page


def encode_cursor(values: Sequence[Any]) -> str:
    raw = json.dumps([v.isoformat() if isinstance(v, datetime) else v for v in values])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, n: int) -> list[Any]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(values, list) or len(values) != n:
            raise ValueError("wrong shape")
        return values
    except (ValueError, TypeError) as exc:
        raise InvalidRequest("invalid pagination cursor") from exc


# Every column a caller may name; one statement built once (the ORM's bulk insert cost more
# than the rows' own insert on SQLite).
_EVENT_COLUMNS = tuple(c.name for c in Event.__table__.columns
                       if c.name not in ("id", "created_at"))
_INSERT_EVENTS = insert(Event.__table__)


def add_events(session: Session, rows: list[dict[str, Any]]) -> None:
    """Bulk-insert event rows (one executemany, never one round trip per row). Rows may name
    different columns: the others are NULL, ``created_at`` defaults to now."""
    if rows:
        now = utcnow()
        full = [{**dict.fromkeys(_EVENT_COLUMNS), "created_at": now, **row} for row in rows]
        session.execute(_INSERT_EVENTS, full)
