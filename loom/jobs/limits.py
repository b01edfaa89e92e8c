"""Tenant limits: what a tenant may queue and submit, checked inside the submission's transaction,
and what each tenant uses now (``loom tenants list``, the admin API).

Limits (defaults from config, overrides per tenant; None: no limit):
- ``max_queued_items``: open items (queued or running) over all the tenant's jobs, the new job's
  included; over it the job is refused with 429 and Retry-After.
- ``submissions_per_minute``: jobs created in the last 60 seconds; the 429's Retry-After is when
  the oldest of them leaves the window.
- ``max_items_per_job``: one job's size; 413 (waiting does not help).
- ``max_running_items``: items of the tenant running at once across the fleet, enforced where
  items are claimed (loom.jobs.shares).
- ``weight``: the tenant's fair share of claims (loom.jobs.shares).

Nothing is half-accepted: the checks run in the transaction that inserts the job, which rolls
back whole. On PostgreSQL the tenant's row is locked first, so two concurrent submissions of one
tenant cannot both pass a check that only one of them fits (SQLite's write lock already
serializes them). Idempotent replays return the earlier job before any check.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from loom.errors import InvalidRequest, JobTooLarge, LimitExceeded, NotFound
from loom.jobs.types import OPEN_ITEM_PHASE
from loom.models import Item, Job, JobStatus, Tenant

OPEN_JOB = (JobStatus.queued.value, JobStatus.running.value, JobStatus.cancelling.value,
            JobStatus.finalizing.value)
RATE_WINDOW = timedelta(seconds=60)
# A full queue frees as the fleet works through it; when that is cannot be known at submit.
QUEUE_RETRY_AFTER = 30.0


@dataclass(frozen=True)
class Limits:
    max_queued_items: int | None = None
    max_running_items: int | None = None
    submissions_per_minute: int | None = None
    max_items_per_job: int | None = None
    weight: float = 1.0

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        """The configured defaults (``tenant_*`` settings)."""
        return cls(**{n: getattr(settings, f"tenant_{n}") for n in
                      ("max_queued_items", "max_running_items", "submissions_per_minute",
                       "max_items_per_job", "weight")})


NAMES = tuple(f.name for f in fields(Limits))


@dataclass(frozen=True)
class Use:
    open_items: int  # queued or running
    running_items: int
    submissions_last_minute: int


@dataclass(frozen=True)
class TenantLimits:
    tenant_id: str
    name: str
    limits: Limits  # in effect: overrides over the defaults
    overrides: dict[str, Any]  # only what the tenant sets itself
    use: Use


def effective(tenant: Tenant, defaults: Limits) -> Limits:
    """The tenant's overrides over ``defaults``."""
    return replace(defaults, **{n: getattr(tenant, n) for n in NAMES
                                if getattr(tenant, n) is not None})


def overrides(tenant: Tenant) -> dict[str, Any]:
    return {n: getattr(tenant, n) for n in NAMES if getattr(tenant, n) is not None}


def open_items(session: Session, *, tenant_id: str) -> int:
    """The tenant's queued and running items, over its jobs that are not finished."""
    return int(session.scalar(
        select(func.count()).select_from(Item).join(Job, Job.id == Item.job_id)
        .where(Job.tenant_id == tenant_id, Job.status.in_(OPEN_JOB),
               OPEN_ITEM_PHASE)) or 0)


def tenant_use(session: Session, *, tenant_id: str, now: datetime) -> Use:
    counts = dict(session.execute(
        select(Item.status, func.count()).join(Job, Job.id == Item.job_id)
        .where(Job.tenant_id == tenant_id, Job.status.in_(OPEN_JOB), OPEN_ITEM_PHASE)
        .group_by(Item.status)).all())
    recent = session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.created_at > now - RATE_WINDOW)) or 0
    return Use(open_items=int(sum(counts.values())), running_items=int(counts.get("running", 0)),
               submissions_last_minute=int(recent))


def admit_job(session: Session, *, tenant_id: str, defaults: Limits, now: datetime) -> Limits:
    """Before the job's rows: lock the tenant (PostgreSQL), refuse over the submission rate.
    Returns the tenant's limits for ``admit_items``."""
    if session.get_bind().dialect.name == "postgresql":
        tenant = session.scalars(select(Tenant).where(Tenant.id == tenant_id)
                                 .with_for_update()).one()
    else:
        tenant = session.get(Tenant, tenant_id)
        if tenant is None:
            raise NotFound(f"no tenant {tenant_id}")
    limits = effective(tenant, defaults)
    per_minute = limits.submissions_per_minute
    if per_minute is not None:
        times = session.scalars(
            select(Job.created_at).where(Job.tenant_id == tenant_id,
                                         Job.created_at > now - RATE_WINDOW)
            .order_by(Job.created_at.desc()).limit(per_minute)).all()
        if len(times) >= per_minute:
            # The per_minute-th newest must leave the window before one more fits.
            wait = (times[-1] + RATE_WINDOW - now).total_seconds()
            raise LimitExceeded(
                f"tenant {tenant.name!r} is at its limit of {per_minute} submissions per "
                f"minute ({len(times)} in the last 60 s); retry in {max(1, round(wait))} s",
                retry_after=wait)
    return limits


def admit_items(session: Session, *, tenant_id: str, tenant_name: str | None = None,
                limits: Limits, count: int) -> None:
    """After the job's items are inserted (uncommitted): refuse a job over the per-job size or
    one that takes the tenant's open items over its limit."""
    who = f"tenant {tenant_name!r}" if tenant_name else "this tenant"
    if limits.max_items_per_job is not None and count > limits.max_items_per_job:
        raise JobTooLarge(f"a job of {count} items is over {who}'s limit of "
                          f"{limits.max_items_per_job} items per job")
    if limits.max_queued_items is not None:
        total = open_items(session, tenant_id=tenant_id)  # the new job's items included
        if total > limits.max_queued_items:
            raise LimitExceeded(
                f"{who} would have {total} open (queued or running) items with this job of "
                f"{count}, over its limit of {limits.max_queued_items} "
                f"({total - count} open now)", retry_after=QUEUE_RETRY_AFTER)


def set_limits(session: Session, *, tenant_name: str, changes: dict[str, Any],
               reset: bool = False) -> Tenant:
    """Set (or, with ``reset``, first clear) a tenant's overrides; a value of None in
    ``changes`` clears that one. Creates nothing: the tenant must exist."""
    unknown = set(changes) - set(NAMES)
    if unknown:
        raise InvalidRequest(f"unknown limit(s): {', '.join(sorted(unknown))}; "
                             f"valid: {', '.join(NAMES)}")
    for name, value in changes.items():
        if value is not None and (value <= 0 if name == "weight" else value < 1):
            raise InvalidRequest(f"{name} must be {'> 0' if name == 'weight' else '>= 1'}, "
                                 f"not {value}")
    tenant = session.scalars(select(Tenant).where(Tenant.name == tenant_name)).one_or_none()
    if tenant is None:
        raise NotFound(f"no tenant named {tenant_name!r}")
    if reset:
        for name in NAMES:
            setattr(tenant, name, None)
    for name, value in changes.items():
        setattr(tenant, name, value)
    session.commit()
    return tenant


def list_limits(session: Session, *, defaults: Limits, now: datetime,
                tenant_name: str | None = None) -> list[TenantLimits]:
    query = select(Tenant).order_by(Tenant.name)
    if tenant_name is not None:
        query = query.where(Tenant.name == tenant_name)
    found = [TenantLimits(tenant_id=t.id, name=t.name, limits=effective(t, defaults),
                          overrides=overrides(t), use=tenant_use(session, tenant_id=t.id, now=now))
             for t in session.scalars(query)]
    session.rollback()
    if tenant_name is not None and not found:
        raise NotFound(f"no tenant named {tenant_name!r}")
    return found
