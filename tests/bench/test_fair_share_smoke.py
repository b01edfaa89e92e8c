"""bench/fair_share.py must keep running: every part on small jobs against the real services
(the numbers are not checked; the benchmark prints ratios, tests never time anything)."""

from __future__ import annotations

from pathlib import Path

from fixtures_worker import require_model
from test_backend_benches_smoke import admin, run_bench


def test_fair_share_bench_runs_every_part(tmp_path: Path, pg_url: str, redis_url: str) -> None:
    require_model()
    out = run_bench("fair_share.py", "--n", "300", "--b-jobs", "2", "--pair", "200",
                    "--batch", "8", "--pg", admin(pg_url), "--redis", redis_url)
    assert "A alone: fair share off" in out and "B's one-item jobs: idle fleet median" in out
    assert "weights 2:1" in out
    assert "8 submissions: 5 accepted, 3 refused with 429" in out
