"""Submit a Parquet table of image URLs (pointing at a local HTTP server) as one job, at two
sizes side by side, and show that memory does not grow with the table: each run in its own
process, its peak RSS and rows/s printed, with the ratio of the big run's peak to the small one's.

    .venv/bin/python bench/dataset_submit.py [--rows 100000,1000000] [--paths embedded,api]
        [--database sqlite|postgresql://...]

Paths:
- ``embedded``: what ``loom caption TABLE.parquet`` does before its engines run: the table read
  in streaming batches (loom.cli.inputs), each row an item, inserted as they come
  (jobs.submit_job), on SQLite under a temporary LOOM_HOME (or --database).
- ``api``: what ``POST /v1/jobs {"manifest_key"}`` does with a JSONL manifest that
  ``Client.submit_dataset`` uploaded: the manifest streamed from the store, each line validated
  and inserted as it comes (api.service.submit), on --database; the broker is a counter.

Inference is not run (that is bench/eta.py); the URLs are served by a local HTTP server so the
table is what a user would submit, and one of them is fetched to check. A flat path has about
the same peak at 1,000,000 rows as at 100,000.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PNG = (ROOT / "examples" / "images").glob("*.png")


def peak_mb() -> float:
    """VmHWM: the peak RSS of this process image."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def write_table(path: Path, n: int, base_url: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("url", pa.string()), ("id", pa.string()), ("label", pa.int64())])
    with pq.ParquetWriter(path, schema) as w:
        for lo in range(0, n, 100_000):
            idx = range(lo, min(lo + 100_000, n))
            w.write_table(pa.table({
                "url": [f"{base_url}/img/{i % 12:02d}.png?row={i}" for i in idx],
                "id": [f"row-{i:07d}" for i in idx], "label": [i % 10 for i in idx]},
                schema=schema))


def write_manifest(path: Path, n: int, base_url: str) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"image_url": f"{base_url}/img/{i % 12:02d}.png?row={i}",
                                "metadata": {"id": f"row-{i:07d}", "label": i % 10}}) + "\n")


def run_embedded(table: Path, home: Path, database: str | None) -> dict[str, Any]:
    os.environ["LOOM_HOME"] = str(home)
    if database:
        os.environ["LOOM_DATABASE_URL"] = database
    from loom import jobs, tasks
    from loom.cli.common import open_local
    from loom.cli.inputs import DatasetOpts, image_sources
    from loom.models import new_id
    from worker.local_run import _stored, sources_of

    local = open_local()
    spec = tasks.get("caption")
    start_mb = peak_mb()
    t0 = time.perf_counter()
    job_id = new_id()
    with local.session_factory() as s:
        job = jobs.submit_job(
            s, job_id=job_id, tenant_id=local.tenant_id, task="caption",
            model_name=local.settings.default_model,
            items=_stored(local, job_id, sources_of(
                image_sources([str(table)], spec, DatasetOpts(image_col="url", id_col="id")))),
            chunk_size=local.settings.chunk_size, max_attempts=local.settings.max_attempts)
        count = job.item_count
    seconds = time.perf_counter() - t0
    local.close()
    return {"items": count, "seconds": seconds, "start_mb": start_mb, "peak_mb": peak_mb()}


def run_api(manifest: Path, home: Path, database: str) -> dict[str, Any]:
    from api import service
    from api.deps import Runtime
    from api.schemas import JobRequest
    from loom import db, storage, tenants
    from loom.config import Settings

    settings = Settings(home=home, database_url=database, storage_url=f"file://{home / 'store'}")
    db.upgrade(database)
    engine = db.make_engine(database)
    factory = db.make_session_factory(engine)
    with factory() as s:
        tenant_id = tenants.ensure_tenant(s, name="bench").id
        s.commit()
    store = storage.store_from_settings(settings)
    key = storage.file_key(tenant_id, "file-bench", "jsonl")
    with manifest.open("rb") as f:
        store.put_stream(key, f, "application/jsonl")
    published = [0]
    rt = Runtime(settings=settings, engine=engine, session_factory=factory, store=store,
                 publish=lambda chunk: published.__setitem__(0, published[0] + 1))
    start_mb = peak_mb()
    t0 = time.perf_counter()
    with factory() as s:
        job = service.submit(s, rt, tenant_id=tenant_id, idempotency_key=None, body_hash="x",
                             req=JobRequest(task="caption", manifest_key=key))
        count = job.item_count
    seconds = time.perf_counter() - t0
    engine.dispose()
    return {"items": count, "seconds": seconds, "start_mb": start_mb, "peak_mb": peak_mb(),
            "chunks_published": published[0]}


class _Images(http.server.BaseHTTPRequestHandler):
    images = sorted(PNG)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        n = int(self.path.split("/img/")[1][:2])
        body = self.images[n % len(self.images)].read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _fresh_pg(url: str) -> str:
    """A new database beside the one named (dropped by the caller)."""
    import psycopg

    base, _, _ = url.rpartition("/")
    name = f"loom_bench_{os.getpid()}_{time.monotonic_ns() % 10**9}"
    with psycopg.connect(url.replace("+psycopg", "", 1), autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return f"{base}/{name}"


def _drop_pg(url: str) -> None:
    import psycopg

    base, _, name = url.rpartition("/")
    with psycopg.connect(f"{base}/postgres".replace("+psycopg", "", 1), autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="100000,1000000")
    ap.add_argument("--paths", default="embedded,api")
    ap.add_argument("--database", default="postgresql+psycopg://root@127.0.0.1:5432/test",
                    help="PostgreSQL for the api path (a fresh database is made beside it)")
    ap.add_argument("--child", nargs=4, metavar=("PATH", "INPUT", "HOME", "DB"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        path, inp, home, database = args.child
        run = run_embedded if path == "embedded" else run_api
        out = run(Path(inp), Path(home), None if database == "-" else database)  # type: ignore[arg-type]
        print(json.dumps(out))
        return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_port}"
    with urllib.request.urlopen(f"{base_url}/img/00.png?row=0") as r:  # the URLs do serve
        assert r.read(8) == b"\x89PNG\r\n\x1a\n"
    sizes = [int(x) for x in args.rows.split(",")]
    paths = args.paths.split(",")
    results: dict[tuple[str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            table, manifest = Path(tmp) / f"urls-{n}.parquet", Path(tmp) / f"urls-{n}.jsonl"
            if "embedded" in paths:
                write_table(table, n, base_url)
            if "api" in paths:
                write_manifest(manifest, n, base_url)
            for path in paths:
                home = Path(tmp) / f"home-{path}-{n}"
                database = _fresh_pg(args.database) if path == "api" else "-"
                try:
                    proc = subprocess.run(
                        [sys.executable, __file__, "--child", path,
                         str(table if path == "embedded" else manifest), str(home), database],
                        capture_output=True, text=True, check=False, cwd=ROOT)
                finally:
                    if database != "-":
                        _drop_pg(database)
                if proc.returncode != 0:
                    sys.exit(f"{path} {n}: {proc.stderr[-3000:]}")
                results[(path, n)] = r = json.loads(proc.stdout.strip().splitlines()[-1])
                assert r["items"] == n, r
                print(f"{path:9s} {n:>9,d} rows: {n / r['seconds']:>9,.0f} rows/s  "
                      f"peak RSS {r['peak_mb']:7.1f} MB (after imports {r['start_mb']:6.1f} MB)",
                      flush=True)
    server.shutdown()
    small, big = min(sizes), max(sizes)
    if small != big:
        for path in paths:
            a, b = results[(path, small)], results[(path, big)]
            print(f"{path:9s} peak at {big:,} / peak at {small:,}: "
                  f"{b['peak_mb'] / a['peak_mb']:.2f}x for {big / small:.0f}x the rows; "
                  f"growth over imports {b['peak_mb'] - b['start_mb']:.0f} MB vs "
                  f"{a['peak_mb'] - a['start_mb']:.0f} MB")


if __name__ == "__main__":
    main()
