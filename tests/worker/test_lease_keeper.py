"""The worker's lease bookkeeping (worker.leases.LeaseKeeper), a pure unit: which lease rows a
batch ends (the last of their items the worker holds), so that the finisher can hand them to
the completion that deletes them."""

from __future__ import annotations

from typing import Any

from loom.jobs import ClaimedItem
from worker.leases import LeaseKeeper


def item(item_id: int, lease: int | None, job: str = "j") -> ClaimedItem:
    return ClaimedItem(id=item_id, job_id=job, tenant_id="t", index=item_id, task="caption",
                       model_name="m", params={}, input={}, attempts=1, lease_id=lease)


def keeper() -> LeaseKeeper:
    session_factory: Any = None  # never used: no heartbeat here
    return LeaseKeeper(session_factory=session_factory, worker_id="w", lease_seconds=60,
                       interval_seconds=20)


def test_a_lease_ends_with_the_last_of_its_items_held() -> None:
    k = keeper()
    k.add([item(1, 10), item(2, 10), item(3, 10), item(4, 11, job="k")])
    assert k.ending([1, 2]) == set()  # item 3 of lease 10 is still held
    k.discard([1, 2])
    assert k.ending([3]) == {10}
    assert k.ending([3, 4]) == {10, 11}
    assert k.jobs(excluding=[3]) == {"k"}
    k.discard([3, 4])
    assert k.held() == [] and k.ending([3, 4]) == set()


def test_items_without_a_lease_row_end_none() -> None:
    k = keeper()
    k.add([item(1, None), item(2, 7)])
    assert k.ending([1]) == set()
    assert k.ending([1, 2]) == {7}
