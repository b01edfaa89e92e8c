"""``loom verify JOB [--repair]`` on the embedded state: a lost output object is reported (exit
1), --repair requeues exactly that item, ``loom run`` re-creates it, and verify is clean again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_worker import require_model

LOOM = [str(Path(sys.executable).parent / "loom")]


def loom(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env.update({"LOOM_HOME": str(home), "LOOM_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
                "COLUMNS": "200"})
    return subprocess.run([*LOOM, *args], cwd=home, env=env, capture_output=True, text=True,
                          timeout=300)


def test_verify_reports_a_lost_output_and_repair_reruns_exactly_it(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    require_model()
    home = tmp_path_factory.mktemp("loom-verify")
    made = loom(home, "generate", "a small red circle", "--seed", "1", "--variants", "3",
                "--out", str(home / "gen"))
    assert made.returncode == 0, made.stderr
    job_id = loom(home, "jobs").stdout.split("\t")[0]
    clean = loom(home, "verify", job_id)
    assert clean.returncode == 0 and "3 outputs, 0 missing, 0 corrupt" in clean.stdout
    results = [json.loads(line) for line in loom(home, "results", job_id).stdout.splitlines()]
    lost_key = results[1]["output"]["storage_key"]
    (home / "store" / lost_key).unlink()

    found = loom(home, "verify", job_id)
    assert found.returncode == 1
    assert "1 missing" in found.stdout and f"#1 missing: {lost_key}" in found.stderr
    repaired = loom(home, "verify", job_id, "--repair")
    assert repaired.returncode == 0 and "requeued 1 items" in repaired.stdout
    assert loom(home, "run", job_id).returncode == 0
    again = loom(home, "verify", job_id)
    assert again.returncode == 0 and "0 missing" in again.stdout, again.stdout + again.stderr
    assert (home / "store" / lost_key).exists()
