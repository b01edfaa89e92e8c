"""bench/gpu_check.py, bench/backend_overhead.py and bench/openai_backend.py must keep running:
each on a handful of scenes on the CPU, against the real services (the numbers are not checked;
benchmarks print ratios, tests never time anything). gpu_check.py waits for a session with a GPU:
this is what keeps it ready."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fixtures_worker import require_model

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def admin(pg_url: str) -> str:
    """The server's maintenance database, where a bench creates (and drops) its own."""
    return pg_url.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)[0] + "/postgres"


def test_gpu_check_runs_every_section_on_the_cpu(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    require_model()
    out = run_bench("gpu_check.py", "--device", "cpu", "--n", "8", "--batches", "4",
                    "--modes", "bare,embedded,local", "--work", str(tmp_path),
                    "--pg", admin(pg_url), "--redis", redis_url)
    assert "device cpu" in out
    sweep = [ln.split() for ln in out.splitlines() if ln.startswith(("fp32 ", "bf16 "))]
    assert [row[0] for row in sweep] == ["fp32", "bf16"]
    assert sweep[0][-1] == "100.0%"  # fp32 agrees with itself
    for task in ("caption", "generate"):
        for mode in ("embedded", "local"):
            line = next(ln for ln in out.splitlines()
                        if ln.startswith(task) and f" {mode} " in ln and "items" not in ln)
            assert float(line.split()[5]) > 0  # a ratio against the bare loop
        assert f"{task} embedded: model busy" in out
    backends = out.split("== 3.")[1]
    for name in ("loom-shapes", "hf:tiny-chat", "hf:tiny-clip", "diffusers:tiny-sd"):
        assert name in backends


def test_openai_backend_bench_runs_against_the_local_front_door(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    require_model()
    out = run_bench("openai_backend.py", "--n", "12", "--windows", "2,4", "--batch", "4",
                    "--every", "3", "--retry-after", "0.2", "--pg", admin(pg_url),
                    "--redis", redis_url)
    assert "server's own rate,   4 client threads" in out
    assert "failed 0" in out.split("backend alone")[1].splitlines()[0]
    faults = next(ln for ln in out.splitlines() if ln.startswith("under 429s"))
    assert "failed 0" in faults and int(faults.split("throttled ")[1].split(",")[0]) > 0
    assert "window size: min" in out
