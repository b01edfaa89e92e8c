"""Fair share between tenants, decided where workers claim (PostgreSQL).

Chunk messages reach workers in the order Redis holds them, so a tenant that queued a million
items first would hold every worker. Here a message is a wake-up rather than an order: before a
worker claims from its message's job, it looks at who else waits for the same model call
(``share_state``) and may serve someone else first (``choose``), through ``claim_fill`` narrowed
to one tenant and one lane. The message's own job is not skipped, only deferred: its worker
claims from it again at its next batch, and every job keeps its own message, so nothing strands.

- Weighted share: each claim statement writes one ``tenant_claims`` row (tenant, the job's size,
  when, how many items). Over the last ``window`` seconds, a tenant's claimed items divided by
  its weight is its use; the waiting tenant with the least use is served next, once the message's
  tenant is ahead of it by more than one batch (no flapping on ties). Within a tenant, the
  claim goes by priority, then age, as before; priorities never cross tenants' shares.
- Fast lane: jobs of at most ``fast_max_items`` items go ahead of bulk work, as long as they took
  less than ``fast_max_share`` of the window's claims; past that, bulk work waiting is served
  first, so a flood of small jobs cannot starve bulk work either.
- Between batches a worker also asks whether a fast-lane job waits (``fast_lane_waiting``, one
  EXISTS): if so its batch runs before the batches already claimed, so a one-item job waits
  for the batch in flight only.
- The running cap: a tenant with ``max_running_items`` items in flight is not picked, and a
  message of such a tenant serves others or waits (``Decision.wait``).

``queue_place`` tells a waiting job where it stands and why (the job page, ``loom status``).

The state is read in one statement (one row per waiting tenant); the worker caches it for a
fraction of a second and counts its own claims into it meanwhile (worker/claiming.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, select, text
from sqlalchemy.orm import Session

from loom import tasks
from loom.jobs.hot_pg import hot_connection, statement
from loom.jobs.leases import running_by_tenant
from loom.jobs.limits import Limits
from loom.jobs.types import OPEN_ITEM_PHASE
from loom.models import Item, Job, Tenant, TenantClaim, utcnow

# A job with an item no attempt was spent on, available now (what a fill may take).
_HAS_FRESH = """
      AND EXISTS (SELECT 1 FROM items WHERE items.job_id = o.id AND items.phase = 'open'
                  AND items.status = 'queued'
                  AND items.attempts = items.attempts_excused
                  AND (items.available_at IS NULL OR items.available_at <= :now))"""

_STATE = text(f"""
WITH l AS (
    SELECT task, model_name, params, use_cache, tenant_id FROM jobs WHERE id = :like
),
w AS (
    SELECT o.tenant_id, bool_or(o.item_count <= :small) AS small,
           bool_or(o.item_count > :small) AS bulk
    FROM jobs AS o, l
    WHERE o.status IN ('queued', 'running')
      AND o.task = l.task AND o.model_name = l.model_name
      AND CAST(o.params AS text) = CAST(l.params AS text) AND o.use_cache = l.use_cache
      AND (l.model_name = ANY(:shared) OR l.model_name LIKE :hf OR o.tenant_id = l.tenant_id){_HAS_FRESH}
    GROUP BY o.tenant_id
),
c AS (
    SELECT tenant_id, sum(n) AS n, sum(n) FILTER (WHERE job_items <= :small) AS small_n
    FROM tenant_claims WHERE claimed_at > :since GROUP BY tenant_id
),
-- Items running under a live lease (loom.jobs.leases: no index tracks the running items).
r AS (
    SELECT l.tenant_id, count(*) AS n
    FROM leases AS l, unnest(l.item_ids) AS u(id), items
    WHERE l.expires_at >= :now AND l.tenant_id IN (SELECT tenant_id FROM w)
      AND items.id = u.id AND items.status = 'running' AND items.lease_owner = l.worker_id
    GROUP BY l.tenant_id
)
SELECT w.tenant_id, w.small, w.bulk, COALESCE(c.n, 0) AS claimed,
       t.weight, t.max_running_items, COALESCE(r.n, 0) AS running,
       (SELECT tenant_id FROM l) AS own,
       (SELECT COALESCE(sum(n), 0) FROM c) AS total,
       (SELECT COALESCE(sum(small_n), 0) FROM c) AS total_small
FROM w JOIN tenants AS t ON t.id = w.tenant_id
LEFT JOIN c ON c.tenant_id = w.tenant_id
LEFT JOIN r ON r.tenant_id = w.tenant_id
""")


@dataclass
class Waiting:
    """A tenant with fresh items the same model call can serve."""

    tenant_id: str
    weight: float
    claimed: float  # items claimed in the window (plus the worker's own since it read them)
    small: bool  # has a fast-lane job waiting
    bulk: bool  # has a bulk job waiting
    running: int
    max_running: int | None

    @property
    def use(self) -> float:
        return self.claimed / self.weight

    @property
    def capped(self) -> bool:
        return self.max_running is not None and self.running >= self.max_running


@dataclass
class ShareState:
    own_tenant: str | None
    waiting: dict[str, Waiting] = field(default_factory=dict)
    total: float = 0.0  # every tenant's claims in the window
    total_small: float = 0.0  # of which fast-lane jobs'

    def count(self, tenant_id: str, n: int, *, small: bool) -> None:
        """A claim of this worker since the state was read."""
        self.total += n
        if small:
            self.total_small += n
        w = self.waiting.get(tenant_id)
        if w is not None:
            w.claimed += n
            w.running += n


@dataclass(frozen=True)
class Decision:
    """Serve ``tenant_id``'s jobs of ``job_items`` size first (both None: the message's own job);
    ``wait``: the message's tenant is at its running cap and nobody else can be served."""

    tenant_id: str | None = None
    job_items: tuple[int, int] | None = None
    wait: bool = False


OWN = Decision()


def share_state(session: Session, *, like: str, now: datetime, window: float,
                fast_max_items: int, defaults: Limits) -> ShareState:
    """Read by every worker process every few hundred milliseconds: on the claim path's own
    connection, prepared once (planned anew per call it cost three of its four milliseconds)."""
    with hot_connection(session) as conn:
        rows = conn.execute(_STATE_SQL, {
            "like": like, "now": now, "since": now - timedelta(seconds=window),
            "small": fast_max_items, "shared": list(tasks.BUILTIN_MODELS),
            "hf": tasks.HF_PREFIX + "%"})
    state = ShareState(own_tenant=rows[0][7] if rows else None)
    for (tenant_id, small, bulk, claimed, weight, max_running, running, _own, total,
         total_small) in rows:
        state.total, state.total_small = float(total), float(total_small)
        state.waiting[tenant_id] = Waiting(
            tenant_id=tenant_id, claimed=float(claimed), small=bool(small), bulk=bool(bulk),
            running=int(running),
            weight=float(weight if weight is not None else defaults.weight),
            max_running=(max_running if max_running is not None
                         else defaults.max_running_items))
    return state


def choose(state: ShareState, *, own_items: int, batch: int, fast_max_items: int,
           fast_max_share: float, own_dry: bool = False) -> Decision:
    """Whom a worker holding a message of the state's own tenant (a job of ``own_items``
    items) serves next; see the module docstring. A message whose job has nothing fresh left
    (``own_dry``: it fills its batches from other jobs) serves whoever is owed most, its own
    tenant's other jobs included, never merely the oldest job."""
    decision = _choose(state, own_items=own_items, batch=batch, fast_max_items=fast_max_items,
                       fast_max_share=fast_max_share)
    if decision == OWN and own_dry and state.own_tenant in state.waiting:
        own_small = own_items <= fast_max_items
        return Decision(state.own_tenant, (0, fast_max_items) if own_small else None)
    return decision


def _choose(state: ShareState, *, own_items: int, batch: int, fast_max_items: int,
            fast_max_share: float) -> Decision:
    own = state.waiting.get(state.own_tenant or "")
    if not state.waiting or (own is not None and len(state.waiting) == 1 and not own.capped):
        return OWN
    small_lane = (0, fast_max_items)
    bulk_lane = (fast_max_items + 1, 2**31 - 1)
    own_small = own is not None and own_items <= fast_max_items
    others = [w for w in state.waiting.values() if not w.capped]

    def least_used(among: list[Waiting]) -> Waiting:
        return min(among, key=lambda w: (w.use, w.tenant_id))

    fast_share = state.total_small / state.total if state.total else 0.0
    lane_full = fast_max_share < 1.0 and fast_share >= fast_max_share
    # The fast lane first, while it has taken less than its share; then bulk work, if the lane
    # is over its share and the message is a small job's.
    if not own_small and not lane_full:
        small = [w for w in others if w.small]
        if small:
            return Decision(least_used(small).tenant_id, small_lane)
    if own_small and lane_full:
        bulk = [w for w in others if w.bulk]
        if bulk:
            return Decision(least_used(bulk).tenant_id, bulk_lane)
    if own is None or own.capped:
        if not others:
            return Decision(wait=True) if own is not None else OWN
        return Decision(least_used(others).tenant_id, None)
    pick = least_used(others)
    if pick.tenant_id != own.tenant_id and own.use - pick.use > batch / own.weight:
        return Decision(pick.tenant_id, None)
    return OWN


def prune_claims(session: Session, *, before: datetime) -> int:
    """Drop the window's rows older than ``before`` (the reconciler, every pass)."""
    n = session.execute(delete(TenantClaim).where(TenantClaim.claimed_at < before)).rowcount
    session.commit()
    return int(n or 0)


def queue_place(session: Session, *, job: Job, defaults: Limits) -> dict[str, Any] | None:
    """Where a waiting job stands (queued items, none running), or None: the open items of
    earlier or more urgent jobs of its own tenant for the same model call, the other tenants'
    open items the fleet interleaves by share before it gets to this job, and why it waits."""
    counts = dict(session.execute(
        select(Item.status, func.count()).where(Item.job_id == job.id, OPEN_ITEM_PHASE)
        .group_by(Item.status)).all())
    if job.status not in ("queued", "running") or not counts.get("queued") \
            or counts.get("running"):
        session.rollback()
        return None
    same_call = and_(Job.status.in_(("queued", "running")), Job.id != job.id,
                     Job.task == job.task, Job.model_name == job.model_name)
    rows = session.execute(
        select(Job.tenant_id, Job.priority, Job.created_at, func.count(Item.id))
        .join(Item, Item.job_id == Job.id)
        .where(same_call, OPEN_ITEM_PHASE)
        .group_by(Job.id, Job.tenant_id, Job.priority, Job.created_at)).all()
    own_ahead = sum(n for t, prio, created, n in rows if t == job.tenant_id and (
        prio > job.priority or (prio == job.priority and created < job.created_at)))
    others: dict[str, int] = {}
    for t, _, _, n in rows:
        if t != job.tenant_id:
            others[t] = others.get(t, 0) + n
    weights = {t.id: (t.weight if t.weight is not None else defaults.weight)
               for t in session.scalars(select(Tenant).where(
                   Tenant.id.in_([job.tenant_id, *others])))}
    tenant = session.get(Tenant, job.tenant_id)
    cap = tenant.max_running_items if tenant and tenant.max_running_items is not None \
        else defaults.max_running_items
    running = 0
    if cap is not None:
        running = running_by_tenant(session, tenant_ids=[job.tenant_id],
                                    now=utcnow()).get(job.tenant_id, 0)
    session.rollback()
    own_w = weights.get(job.tenant_id, defaults.weight)
    share = own_w / (own_w + sum(weights.get(t, defaults.weight) for t in others))
    # While this tenant's own earlier items run, the fleet gives the others (1 - share) / share
    # items for each of them; small jobs (the fast lane) wait for little more than a batch.
    interleaved = min(sum(others.values()), round(own_ahead * (1 - share) / share))
    if job.item_count <= 0:
        interleaved = 0
    if cap is not None and running >= cap:
        reason = f"tenant at its running limit ({running} of {cap} items running)"
    elif own_ahead:
        reason = f"behind {own_ahead} items of the tenant's earlier or more urgent jobs"
    elif others:
        reason = (f"sharing the fleet with {len(others)} other tenant(s); this tenant's share "
                  f"is {share:.0%}")
    else:
        reason = "waiting for a worker"
    return {"items_ahead": own_ahead + interleaved, "own_items_ahead": own_ahead,
            "other_items_ahead": interleaved, "share": round(share, 4), "reason": reason}


_FAST_WAITING = text(f"""
SELECT EXISTS (
    SELECT 1 FROM jobs AS o, jobs AS l
    WHERE l.id = :like AND o.id <> :like AND o.status IN ('queued', 'running')
      AND o.item_count <= :small AND o.task = l.task AND o.model_name = l.model_name{_HAS_FRESH}
)
""")


_STATE_SQL, _FAST_WAITING_SQL = statement(_STATE), statement(_FAST_WAITING)


def fast_lane_waiting(session: Session, *, like: str, small: int, now: datetime) -> bool:
    """Whether a fast-lane job that a model call of ``like``'s could serve has fresh items
    (asked between batches, so such a job need not wait for the batches already claimed; on
    the claim path's connection, prepared once, as share_state)."""
    with hot_connection(session) as conn:
        ((found,),) = conn.execute(_FAST_WAITING_SQL, {"like": like, "small": small,
                                                        "now": now})
    return bool(found)
