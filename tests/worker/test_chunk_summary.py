"""What Flower shows for a chunk: worker.tasks.chunk_summary (a chunk whose items all failed says
so in its result)."""

from __future__ import annotations

from worker.engine import ChunkReport
from worker.tasks import chunk_summary


def test_chunk_summary_states() -> None:
    ok = ChunkReport("j", 0, 4, claimed=4, succeeded=4)
    assert chunk_summary(ok)["state"] == "ok" and chunk_summary(ok)["succeeded"] == 4
    bad = ChunkReport("j", 0, 4, claimed=4, failed=4)
    assert chunk_summary(bad) | {"seconds": 0} == {
        "state": "all_failed", "claimed": 4, "succeeded": 0, "failed": 4, "retried": 0,
        "cancelled": 0, "fenced": 0, "cached": 0, "lingered": 0, "filled": 0, "seconds": 0}
    assert chunk_summary(ChunkReport("j", 0, 4, claimed=4, succeeded=1, failed=3))["state"] == (
        "some_failed")
    assert chunk_summary(ChunkReport("j", 0, 4))["state"] == "empty"
