"""Ctrl-C on an embedded run: the engine processes stop after their batch in flight, every lease
is given back (nothing is left `running`), the CLI says where the finished items are, and
`loom run JOB` resumes at once and finishes every item exactly once."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from fixtures_worker import require_model

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "images"
LOOM = [str(Path(sys.executable).parent / "loom")]
N = 400


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env.update({"LOOM_HOME": str(home), "LOOM_DEVICE": "cpu", "LOOM_BATCH_SIZE": "4",
                "LOOM_EMBEDDED_PROCESSES": "2", "LOOM_TORCH_THREADS": "1", "COLUMNS": "200"})
    return env


def _counts(db: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM items GROUP BY status").fetchall())


def test_ctrl_c_releases_leases_and_loom_run_resumes(tmp_path: Path) -> None:
    require_model()
    home, images = tmp_path / "home", tmp_path / "in"
    images.mkdir()
    sources = sorted(EXAMPLES.glob("*.png"))
    for i in range(N):
        shutil.copy(sources[i % len(sources)], images / f"{i:04d}.png")
    db = home / "loom.db"
    proc = subprocess.Popen([*LOOM, "caption", str(images), "--out", str(tmp_path / "c.jsonl")],
                            env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if db.exists():
                try:
                    if _counts(db).get("succeeded", 0) >= 16:
                        break
                except sqlite3.OperationalError:  # the schema is not there yet
                    pass
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal sends the foreground group
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, out + err
    assert "loom run " in err and "loom results " in err, err
    counts = _counts(db)
    assert counts.get("running", 0) == 0, counts  # every lease given back
    assert 16 <= counts.get("succeeded", 0) < N, counts
    with sqlite3.connect(db) as conn:
        (job_id,) = conn.execute("SELECT id FROM jobs").fetchone()
        # Released items are fresh again (the unrun attempt excused: attempt numbers never
        # repeat, but none counts against the cap), not suspects.
        assert conn.execute("SELECT count(*) FROM items WHERE status = 'queued' AND "
                            "(lease_owner IS NOT NULL OR attempts > attempts_excused)"
                            ).fetchone() == (0,)

    t0 = time.monotonic()
    run = subprocess.run([*LOOM, "run", job_id], env=_env(home), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "succeeded" in run.stdout
    assert time.monotonic() - t0 < 240  # no waiting for leases to expire (120 s each)
    assert _counts(db) == {"succeeded": N}
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT item_id) FROM outputs").fetchone() \
            == (N, N)
        assert conn.execute("SELECT max(attempts - attempts_excused) FROM items").fetchone() \
            == (1,)
