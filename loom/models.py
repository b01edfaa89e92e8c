"""Typed SQLAlchemy 2.0 ORM: the database is the source of truth for every job and item.

Timestamps are naive UTC (``utcnow()``) so that lease comparisons behave identically on SQLite,
which has no time zones, and PostgreSQL.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Computed,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
    true,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a real BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    finalizing = "finalizing"
    succeeded = "succeeded"
    completed_with_errors = "completed_with_errors"
    failed = "failed"
    cancelled = "cancelled"


JOB_TERMINAL = frozenset(
    {JobStatus.succeeded, JobStatus.completed_with_errors, JobStatus.failed, JobStatus.cancelled}
)


class ItemStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


ITEM_TERMINAL = frozenset({ItemStatus.succeeded, ItemStatus.failed, ItemStatus.cancelled})


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Standard Webhooks signing secret ("whsec_" + base64), made on first use (loom.webhooks).
    webhook_secret: Mapped[str | None] = mapped_column(String(100))
    # Overrides of the configured limits and fair-share weight (loom.jobs.limits); NULL: default.
    max_queued_items: Mapped[int | None] = mapped_column(Integer)
    max_running_items: Mapped[int | None] = mapped_column(Integer)
    submissions_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_items_per_job: Mapped[int | None] = mapped_column(Integer)
    weight: Mapped[float | None] = mapped_column(Float)

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant")


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    # Only a SHA-256 of the secret is stored; the prefix finds the row without a table scan.
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", "weights_sha256"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(100))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    tasks: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ModelAlias(Base):
    """A tenant's name for a model brought by reference (``hf:PATH``, ``diffusers:PATH``,
    ``openai:NAME@URL``) with default params; resolved when a job is submitted."""

    __tablename__ = "model_aliases"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(64))
    ref: Mapped[str] = mapped_column(String(2000))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class RegisteredModel(Base):
    """A model version a tenant trained (a finetune job) and may run by name: its weights in the
    tenant's storage, what it was trained from, and how it scored on held-out rows."""

    __tablename__ = "registered_models"
    __table_args__ = (UniqueConstraint("tenant_id", "name", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(String(200))
    base_weights_sha256: Mapped[str] = mapped_column(String(64))
    weights_key: Mapped[str] = mapped_column(Text)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    training_sha256: Mapped[str] = mapped_column(String(64))
    training_rows: Mapped[int] = mapped_column(Integer)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The finetune job that trained it: one registration per job, whichever attempt finished.
    job_id: Mapped[str] = mapped_column(String(32), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        # Keyset pagination of a tenant's jobs: (created_at, id) descending.
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    task: Mapped[str] = mapped_column(String(20))
    model_name: Mapped[str] = mapped_column(String(200))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(24), default=JobStatus.queued.value, index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    # Which webhook events to send: a subset of loom.webhooks.EVENTS (None = ["completed"]).
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON)
    parent_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    job_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    item_count: Mapped[int] = mapped_column(Integer, default=0)
    chunk_size: Mapped[int] = mapped_column(Integer)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    # Reuse earlier outputs for the same (input, task, model weights, params, seed).
    use_cache: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    results_key: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


# What the item indexes read instead of ``status`` (migration 0015): a claim turns queued into
# running and leaves this as it was, so no index entry changes and PostgreSQL updates the row in
# place (HOT). 'retry': queued after spending an attempt (waiting for another).
ITEM_PHASE = ("CASE WHEN status IN ('succeeded', 'failed', 'cancelled') THEN status "
              "WHEN status = 'queued' AND attempts > attempts_excused THEN 'retry' ELSE 'open' END")
OPEN_PHASES = ("open", "retry")  # queued or running


def _partial(where: str) -> dict[str, Any]:
    return {"postgresql_where": text(where), "sqlite_where": text(where)}


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("job_id", "index"),
        # No index reads status, the lease or attempts: only phase, which a claim leaves alone.
        # Partial indexes: an item is in them only while it is open, so a completion adds none.
        # "Does this job have open items?" after a completed batch (maybe_finalize), claims in
        # index order that skip the finished items, a chunk's queued items.
        Index("ix_items_open", "job_id", "index", **_partial("phase IN ('open', 'retry')")),
        # Items waiting for another attempt: the suspect check before each claim.
        Index("ix_items_retried", "job_id", "index", **_partial("phase = 'retry'")),
        # The failed and cancelled items of a job (pages, retry_failed, the failure summary).
        Index("ix_items_unsucceeded", "job_id", "phase", "index",
              **_partial("phase IN ('failed', 'cancelled')")),
        # Room on each page for a claim's new row versions (a HOT update stays on its page);
        # migration 0015 gives pk_items and the (job_id, index) index the same, for the entry a
        # completion adds per item.
        {"postgresql_with": {"fillfactor": 50}},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # No foreign key to jobs (migration 0002): PostgreSQL checks one per inserted row, which
    # was most of the cost of submitting a large job. Items are written only by submit_job,
    # in the same transaction as their job row.
    job_id: Mapped[str] = mapped_column(String(32))
    index: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=ItemStatus.queued.value)
    # What the item asks for: {"image_key"|"image_url", "question", "prompt", "seed", ...}.
    input: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    item_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    # The number of the latest attempt: never decreases, so a result pinned to an attempt
    # (the completion fence, lineage) can never be confused with a later one.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts that do not count against the job's max_attempts: given back after an outage
    # (the store was down, not the item's fault) or forgiven by retry_failed. Attempts spent
    # = attempts - attempts_excused.
    attempts_excused: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Backoff: a transiently failed item is not claimable before this time.
    available_at: Mapped[datetime | None] = mapped_column(DateTime)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    phase: Mapped[str] = mapped_column(String(16), Computed(ITEM_PHASE, persisted=True))

    output: Mapped[Output | None] = relationship(
        back_populates="item", uselist=False,
        primaryjoin="Item.id == foreign(Output.item_id)")


class Output(Base):
    """One result per item, with its lineage. Written only after the upload succeeded."""

    __tablename__ = "outputs"
    # Only outputs the cache can serve (loom.jobs.cache): a key, and inferred, not reused.
    __table_args__ = (Index("ix_outputs_cache_key", "cache_key",
                            **_partial("cache_key IS NOT NULL AND cached_from IS NULL")),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # Unique: one output per item. No foreign key (migration 0014): its per-row check trigger
    # was 6% of the completion's database CPU and guarded nothing (only the completion writes
    # outputs, in the statement that finds their items; items are never deleted).
    item_id: Mapped[int] = mapped_column(BigId, unique=True)
    # No foreign key to jobs and no index (migration 0002): every completion's FK check took a
    # KEY SHARE lock on the one job row, so all workers of a job contended on it (MultiXacts),
    # and nothing looks outputs up by job. loom.jobs copies job_id from the item (whose FK stays).
    job_id: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16))  # "text" | "image"
    text: Mapped[str | None] = mapped_column(Text)
    storage_key: Mapped[str | None] = mapped_column(Text)
    content_type: Mapped[str | None] = mapped_column(String(100))
    sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # Lineage.
    input_sha256: Mapped[str | None] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(100))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(20))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    attempt: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str] = mapped_column(String(200))
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    # What the backend said of this output beyond the model's name (migration 0010): the
    # filled prompt, finish_reason, a remote endpoint and its served model id, weights_verified.
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The result cache (loom/jobs/cache.py): what this output answers, and, for an output that
    # was not inferred but reused, the output it reuses (same object, same text).
    cache_key: Mapped[str | None] = mapped_column(String(64))
    cached_from: Mapped[int | None] = mapped_column(BigInteger)
    # When the attempt that produced it was claimed (migration 0015: the claim writes no event).
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    item: Mapped[Item] = relationship(back_populates="output",
                                      primaryjoin="Item.id == foreign(Output.item_id)")


class Event(Base):
    """Append-only history of attempts and state changes, for lineage and debugging."""

    __tablename__ = "events"
    __table_args__ = (
        # Job-level events only (cancel requested, finalized; migration 0002): item events are
        # two rows per item and are looked up by item_id, so indexing them by job cost two
        # index entries per item for no query.
        Index("ix_events_job_level", "job_id",
              postgresql_where=text("item_id IS NULL"), sqlite_where=text("item_id IS NULL")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # No foreign key (migration 0002), like item_id: an append-only log written twice per item;
    # the FK check locked the hot job row on every claim and completion.
    job_id: Mapped[str] = mapped_column(String(32))
    item_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int | None] = mapped_column(Integer)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    error_code: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    # On an event that ends an attempt: when that attempt was claimed (the claim writes no event
    # since migration 0015; loom.jobs.queries.item_history shows it as the 'claimed' one).
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Outbox(Base):
    """Chunk messages waiting to be published (written in the submission's transaction)."""

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("job_id", "chunk_start"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    chunk_start: Mapped[int] = mapped_column(Integer)
    chunk_end: Mapped[int] = mapped_column(Integer)  # exclusive
    priority: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)
    publish_count: Mapped[int] = mapped_column(Integer, default=0)


class File(Base):
    """An uploaded file (the Files API): a manifest, a dataset table or an image, stored under a
    server-generated key in its tenant's prefix; the user's file name is metadata only."""

    __tablename__ = "files"
    __table_args__ = (
        # Keyset pagination of a tenant's files: (created_at, id) descending.
        Index("ix_files_tenant_created", "tenant_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "file-" + 32 hex
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    storage_key: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Delivery(Base):
    """One webhook message and its delivery state (retried with backoff by the reconciler)."""

    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_status_due", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    msg_id: Mapped[str] = mapped_column(String(64), unique=True)  # the webhook-id header
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(32))  # job.started | job.progress | job.completed
    url: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)  # the exact JSON bytes that are signed and sent
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|delivered|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class Batch(Base):
    """A batch of the OpenAI-compatible Batch API (/openai/v1/batches): an input file whose
    lines run as Loom jobs, one per (task, model, params) group of lines (``job_ids``). Its
    output and error files are written from those jobs' item rows once they are all finished
    (loom/openai_batches.py); until then its counts are read live from the items."""

    __tablename__ = "batches"
    __table_args__ = (
        # Keyset pagination of a tenant's batches: (created_at, id) descending.
        Index("ix_batches_tenant_created", "tenant_id", "created_at", "id"),
        # The reconciler's sweep over the batches still open.
        Index("ix_batches_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "batch_" + 32 hex
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    model: Mapped[str | None] = mapped_column(Text)  # the model the first valid line named
    job_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    request_total: Mapped[int] = mapped_column(Integer, default=0)  # non-blank input lines
    item_total: Mapped[int] = mapped_column(Integer, default=0)  # items of the valid lines
    invalid_count: Mapped[int] = mapped_column(Integer, default=0)  # lines refused at validation
    invalid_key: Mapped[str | None] = mapped_column(Text)  # their error lines (JSONL object)
    completed_count: Mapped[int | None] = mapped_column(Integer)  # set when it finishes
    failed_count: Mapped[int | None] = mapped_column(Integer)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)  # why it failed
    batch_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime)
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    failed_at: Mapped[datetime | None] = mapped_column(DateTime)
    expired_at: Mapped[datetime | None] = mapped_column(DateTime)
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime)
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime)


class TenantClaim(Base):
    """One claim statement's items of one tenant (loom.jobs.limits): the window the workers'
    fair-share scheduler reads. Append-only, pruned by the reconciler; no foreign key (the claim
    statement inserts it and PostgreSQL would check one per row)."""

    __tablename__ = "tenant_claims"
    __table_args__ = (Index("ix_tenant_claims_claimed_at", "claimed_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(32))
    job_items: Mapped[int] = mapped_column(Integer)  # the claimed job's size (the fast lane)
    claimed_at: Mapped[datetime] = mapped_column(DateTime)
    n: Mapped[int] = mapped_column(Integer)


class Lease(Base):
    """One claim statement's lease on the items it took (of one job): what finds the items in
    flight, since no index of ``items`` tracks them (migration 0015). Written by the claim,
    extended by the heartbeat with its items, deleted by the completion that ends its last item
    or, once expired, by the reconciler after it has freed what was left (loom.jobs.leases).
    Every running item is in a lease row of its lease owner. No foreign keys (hot path)."""

    __tablename__ = "leases"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # Indexed: before each claim, "has this job an expired lease?" (loom.jobs.chunks).
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    tenant_id: Mapped[str] = mapped_column(String(32))
    worker_id: Mapped[str] = mapped_column(String(200))
    item_ids: Mapped[list[int]] = mapped_column(
        JSON().with_variant(postgresql.ARRAY(BigInteger()), "postgresql"))
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
