"""bench/eta.py must keep running: its cheapest modes on a handful of scenes (the numbers are not
checked; the benchmark prints ratios, tests never time anything)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fixtures_worker import require_model

ROOT = Path(__file__).resolve().parents[2]


def test_eta_runs_bare_and_embedded_on_a_few_scenes(tmp_path: Path) -> None:
    require_model()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "eta.py"), "--n", "12", "--batch", "4",
         "--modes", "bare,embedded", "--bare", "plan", "--tasks", "caption,generate",
         "--work", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for task in ("caption", "generate"):
        assert f"{task} limit:" in out
        line = next(ln for ln in out.splitlines() if ln.startswith(task) and " embedded " in ln)
        assert float(line.split()[5]) > 0  # items/s over the limit: a ratio was printed
        assert f"stages {task} embedded" in out
        # the best bare loop again with its processes' start-up, which must take some time
        program = next(ln for ln in out.splitlines()
                       if ln.startswith(task) and " as program " in ln)
        assert float(program.split("start-up ")[1].split("s ")[0]) > 0
        assert "of the bare loop as a program" in line
        # read back from the run's own database: the first claim precedes the last result
        timeline = next(ln for ln in out.splitlines() if ln.startswith(f"timeline {task} "))
        first = float(timeline.split("first claim at ")[1].split("s,")[0])
        last = float(timeline.split("last result at ")[1].split("s,")[0])
        assert 0 < first <= last
    assert "infer" in out and "claim" in out and "complete" in out
