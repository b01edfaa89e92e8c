"""Write 1,000,000 result rows as Parquet, WebDataset and HF, and read a 1,000,000-row Parquet of
image URLs back: rows/s and memory side by side, each phase in its own process (so each peak RSS
is its own), with the JSONL export (loom.exports) as the reference.

    .venv/bin/python bench/dataset_export.py [--rows 1000000] [--phases jsonl,parquet,...]

Memory is flat when the RSS after 10% of the rows and the peak at the end are about equal: the
writers hold one row group (10,000 rows) at a time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PHASES = ("baseline", "jsonl", "parquet", "webdataset", "hf", "read_parquet")
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cf000000030101000518d84e0000000049454e44ae426082"
)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_mb() -> float:
    """VmHWM: the peak RSS of this process image (ru_maxrss would carry the parent's over)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def rows(n: int, task: str, marks: dict[str, float]) -> Iterator[dict[str, Any]]:
    """Result rows shaped as loom.exports.result_rows yields them, made one at a time."""
    for i in range(n):
        if i == n // 10:
            marks["rss_at_10pct"] = rss_mb()
        gen = task == "generate"
        yield {
            "index": i, "item_id": i + 1, "status": "failed" if i % 97 == 0 else "succeeded",
            "metadata": {"id": f"img-{i:07d}", "label": i % 10, "source": "bench"},
            "input": ({"prompt": f"a red circle number {i}", "seed": i} if gen
                      else {"image_url": f"http://127.0.0.1:8000/img/{i:07d}.png"}),
            "output": None if i % 97 == 0 else {
                "id": i + 1, "kind": "image" if gen else "text",
                "text": None if gen else f"a small red circle above a blue square {i}",
                "storage_key": f"t/jobs/j/outputs/{i:08d}.png" if gen else None, "url": None,
                "content_type": "image/png" if gen else None, "sha256": "ab" * 32,
                "size_bytes": 68,
            },
            "error": {"code": "invalid_input", "message": "corrupt image"} if i % 97 == 0 else None,
            "lineage": {"model": "loom-shapes", "model_version": "1.0", "weights_sha256": "cd" * 32,
                        "seed": i, "attempt": 1, "worker_id": "host:1:abc",
                        "input_sha256": "ef" * 32, "timings": {"infer_ms": 1.5}},
        }


def run_phase(phase: str, n: int, tmp: Path) -> dict[str, Any]:
    import loom.datasets as D
    from loom import exports

    marks: dict[str, float] = {}
    t0 = time.perf_counter()
    if phase == "baseline":  # making the rows alone
        for _ in rows(n, "caption", marks):
            pass
    elif phase == "jsonl":
        with (tmp / "out.jsonl").open("wb") as f:
            for chunk in exports.jsonl_lines(rows(n, "caption", marks)):
                f.write(chunk)
    elif phase == "parquet":
        D.write_rows("parquet", rows(n, "caption", marks), tmp / "pq", task="caption",
                     shard_rows=500_000)
    elif phase == "webdataset":
        D.write_rows("webdataset", rows(n, "generate", marks), tmp / "wds", task="generate",
                     images=lambda row: (PNG, "png") if row["output"] else None)
    elif phase == "hf":
        D.write_rows("hf", rows(n, "generate", marks), tmp / "hf", task="generate",
                     images=lambda row: (PNG, "png") if row["output"] else None)
    elif phase == "read_parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        src = tmp / "urls.parquet"
        with pq.ParquetWriter(src, pa.schema([("id", pa.string()), ("url", pa.string()),
                                               ("label", pa.int64())])) as w:
            for start in range(0, n, 100_000):
                ids = range(start, min(n, start + 100_000))
                w.write_table(pa.table({
                    "id": [f"img-{i:07d}" for i in ids],
                    "url": [f"http://127.0.0.1:8000/img/{i:07d}.png" for i in ids],
                    "label": [i % 10 for i in ids],
                }))
        marks["rss_before"] = rss_mb()
        t0 = time.perf_counter()
        count = 0
        for batch in D.open_source(src):
            count += len(batch)
            if "rss_at_10pct" not in marks and count >= n // 10:
                marks["rss_at_10pct"] = rss_mb()
        assert count == n, count
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    return {"phase": phase, "seconds": seconds, "rows_per_s": n / seconds,
            "rss_at_10pct_mb": marks.get("rss_at_10pct"), "peak_rss_mb": peak_mb(),
            "bytes_on_disk": size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase, print JSON
    args = ap.parse_args()
    if args.phase:
        with tempfile.TemporaryDirectory(prefix="loom-bench-") as tmp:
            print(json.dumps(run_phase(args.phase, args.rows, Path(tmp))))
        return
    results = []
    for phase in args.phases.split(","):
        proc = subprocess.run([sys.executable, __file__, "--rows", str(args.rows),
                               "--phase", phase], capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ref = next((r for r in results if r["phase"] == "jsonl"), None)
    print(f"{args.rows:,} rows")
    print(f"{'phase':<13}{'seconds':>9}{'rows/s':>11}{'vs jsonl':>9}"
          f"{'RSS@10% MB':>12}{'peak RSS MB':>13}{'on disk MB':>12}")
    for r in results:
        ratio = f"{r['rows_per_s'] / ref['rows_per_s']:.2f}x" if ref else "-"
        at10 = f"{r['rss_at_10pct_mb']:.0f}" if r["rss_at_10pct_mb"] else "-"
        print(f"{r['phase']:<13}{r['seconds']:>9.1f}{r['rows_per_s']:>11,.0f}{ratio:>9}"
              f"{at10:>12}{r['peak_rss_mb']:>13.0f}{r['bytes_on_disk'] / 2**20:>12.1f}")


if __name__ == "__main__":
    main()
