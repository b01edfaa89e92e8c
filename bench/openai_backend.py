"""The ``openai:`` backend against a real OpenAI-compatible server, side by side in one run.

The server is Loom's own front door (``loom api``'s /openai/v1 on PostgreSQL + Redis + a local
store, one ``loom worker`` serving loom-shapes): every chat completion is a one-item Loom job, so
its rate is what a small model server on this host gives. Printed, in one run:

- the server's own rate: N chat completions from plain threads (one httpx client per thread) at
  each window size, the best of them the reference;
- the backend alone (``worker.openai_model.OpenAIModel``, batches of ``--batch`` the way the
  engine calls it) at that window: items/s and its ratio to the server (target >= 0.9);
- an embedded ``loom caption --model openai:...`` job end to end: items/s from its first claim
  to its last result, and the ratio;
- the window under injected 429s (a fault proxy answers every ``--every``-th request 429 with
  Retry-After): items/s, the ratio to no faults, the window's size over time, and that every item
  still came back.

    python bench/openai_backend.py --n 400
"""
from __future__ import annotations

import argparse
import base64
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "api"))

from harness import (  # noqa: E402
    Services, env_for, free_port, loom_cmd, render_inputs, stop_worker)


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, seconds: float = 90) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up; see {log}")
        time.sleep(0.3)


def chat_body(image: bytes) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return {"model": "loom-shapes", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


def server_rate(base: str, images: list[bytes], window: int) -> float:
    """Chat completions per second with ``window`` plain client threads, no Loom in between."""
    import httpx

    local = threading.local()
    errors = []

    def one(image: bytes) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(timeout=120)
        r = client.post(f"{base}/chat/completions", json=chat_body(image))
        if r.status_code != 200:
            errors.append(r.status_code)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(window) as pool:
        list(pool.map(one, images))
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"server answered {len(errors)} errors: {errors[:5]}")
    return len(images) / seconds


def backend_run(base: str, images: list[bytes], window: int, batch: int,
                sample: list[float] | None = None) -> tuple[float, int]:
    """items/s of the backend object called in batches as the engine does; (rate, failed)."""
    from worker.openai_model import OpenAIModel

    model = OpenAIModel(f"loom-shapes@{base}", api_key=None, timeout=120, max_in_flight=window)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            sample.append(model.window.size)  # type: ignore[union-attr]

    watcher = threading.Thread(target=watch, daemon=True) if sample is not None else None
    failed = 0
    try:
        model.caption(images[:2])  # connect and read /v1/models once, outside the clock
        if watcher:
            watcher.start()
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            out = model.caption(images[i:i + batch])
            failed += sum(isinstance(x, Exception) for x in out)
        seconds = time.perf_counter() - t0
    finally:
        stop.set()
        model.close()
    return len(images) / seconds, failed


def embedded_job(base: str, paths: list[Path], work: Path, window: int, batch: int) -> float:
    """items/s of ``loom caption --model openai:...`` from its first claim to its last result."""
    from eta_modes import item_times

    home = work / f"embedded-{window}"
    images = work / "images"
    env = env_for(home=home, device="cpu", batch_size=batch, openai_max_in_flight=window)
    started = time.time()
    proc = subprocess.run([*loom_cmd(), "caption", str(images), "--model",
                           f"openai:loom-shapes@{base}", "--out", str(home / "c.jsonl")],
                          env=env, capture_output=True, text=True, cwd=work)
    if proc.returncode != 0:
        raise RuntimeError(f"embedded job failed:\n{proc.stdout}\n{proc.stderr}")
    first, last = item_times(home / "loom.db", started)
    if first is None or last is None:
        raise RuntimeError("no item times in the embedded database")
    lines = (home / "c.jsonl").read_text().splitlines()
    if len(lines) != len(paths):
        raise RuntimeError(f"{len(lines)} results for {len(paths)} images")
    return len(paths) / (last - first)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400, help="images per measurement")
    ap.add_argument("--windows", default="4,8,16,32", help="window sizes for the server's rate")
    ap.add_argument("--batch", type=int, default=32, help="items per backend call (engine batch)")
    ap.add_argument("--every", type=int, default=10, help="429 on every N-th request")
    ap.add_argument("--retry-after", type=float, default=0.5)
    ap.add_argument("--pg", default=os.environ.get("LOOM_BENCH_PG",
                                                    "postgresql://127.0.0.1:5432/postgres"))
    ap.add_argument("--redis", default=os.environ.get("LOOM_BENCH_REDIS",
                                                       "redis://127.0.0.1:6379/13"))
    a = ap.parse_args(argv)
    from fault_proxy import FaultProxy

    work = Path(tempfile.mkdtemp(prefix="loom-oai-bench-"))
    paths, _ = render_inputs(work, a.n)
    images = [p.read_bytes() for p in paths]
    svc = Services(a.pg, a.redis)
    port = free_port()
    server_env = env_for(home=work / "server-home", database_url=svc.database_url,
                         broker_url=svc.redis_url, storage_url=f"file://{work / 'store'}",
                         auth="off", device="cpu", batch_size=a.batch)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with (work / "worker.log").open("wb") as log:
            procs.append(subprocess.Popen([*loom_cmd(), "worker", "-l", "warning"],
                                          env=server_env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        with (work / "api.log").open("wb") as log:
            procs.append(subprocess.Popen([*loom_cmd(), "api", "--port", str(port)],
                                          env=server_env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        base = f"http://127.0.0.1:{port}/openai/v1"
        wait_http(f"{base}/models", procs[1], work / "api.log")
        server_rate(base, images[:16], 4)  # warm-up: the worker's model loaded

        print(f"{a.n} scenes; server: loom api /openai/v1 + 1 loom worker (PostgreSQL, Redis, "
              f"local store), batch {a.batch}")
        rates = {w: server_rate(base, images, w) for w in
                 (int(x) for x in a.windows.split(","))}
        for w, r in rates.items():
            print(f"  server's own rate, {w:3d} client threads: {r:7.1f} items/s")
        best_w = max(rates, key=lambda w: rates[w])
        best = rates[best_w]

        alone, failed = backend_run(base, images, best_w, a.batch)
        print(f"backend alone, window {best_w}: {alone:7.1f} items/s  "
              f"ratio {alone / best:.2f} (target >= 0.9), failed {failed}")
        job = embedded_job(base, paths, work, best_w, a.batch)
        print(f"embedded loom caption job:   {job:7.1f} items/s  ratio {job / best:.2f}")

        def plan(n: int, path: str) -> str:
            return "429" if path.endswith("/chat/completions") and n % a.every == a.every - 1 \
                else "pass"

        sizes: list[float] = []
        with FaultProxy(base.removesuffix("/openai/v1"), plan,
                        retry_after=a.retry_after) as proxy:
            faulty, failed = backend_run(f"{proxy.url}/openai/v1", images, best_w, a.batch,
                                         sample=sizes)
            seen = dict(proxy.seen)
        print(f"under 429s (every {a.every}-th request, Retry-After {a.retry_after:g}s): "
              f"{faulty:7.1f} items/s  ratio to no faults {faulty / alone:.2f}, "
              f"throttled {seen.get('429', 0)}, failed {failed}")
        if sizes:
            print(f"  window size: min {min(sizes):.0f}  median {statistics.median(sizes):.0f}  "
                  f"max {max(sizes):.0f} of limit {best_w} ({len(sizes)} samples)")
    finally:
        for p in procs:
            stop_worker(p)
        svc.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
