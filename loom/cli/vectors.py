"""``loom dedupe``: duplicate groups of an embed job (or a table of vectors), embedded, or
remote with --api (``POST /v1/jobs/{id}/dedupe``).
The grouping is ``loom.vectors``; ``loom search`` needs the model, so it lives with the embedded
commands (``worker/cli.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loom.cli.common import ApiOpt, KeyOpt, Local, console, embedded, err, fail, remote


def dedupe(
    job_id: Annotated[str | None, typer.Argument(help="An embed job (local).")] = None,
    table: Annotated[Path | None, typer.Option(
        "--table", help="Parquet/JSONL rows with a 'vector' list (+ file, sha256) instead.")]
    = None,
    threshold: Annotated[float | None, typer.Option(
        min=-1.0, max=1.0, help="Cosine at or above which two items are near-duplicates "
                               "(default: 0.9, what the embed head is trained for).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Groups file: .parquet or .jsonl.")]
    = Path("groups.jsonl"),
    method: Annotated[str, typer.Option(
        help="auto (brute force up to 5,000 vectors, then the faiss index) | brute | faiss")]
    = "auto",
    api: ApiOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Group duplicates of an embed job: same input sha256, or cosine >= threshold.

    Writes one row per group member {group, size, index, file, input_sha256, keep, match,
    score}; keep marks the member to keep (the lowest index)."""
    from loom import vectors

    if (job_id is None) == (table is None):
        raise fail("give an embed JOB id or --table FILE (one of them)")
    limit = vectors.DEFAULT_THRESHOLD if threshold is None else threshold
    if api:
        if job_id is None:
            raise fail("--table is local: give a JOB id with --api")
        answer = remote(lambda c: c.dedupe(str(job_id), limit), api, api_key)
        records = [{"group": g["group"], "size": g["size"], **m}
                   for g in answer["groups"] for m in g["members"]]
        _write_records(records, out)
        console.print(f"{answer['vectors']} vectors: {len(answer['groups'])} groups, "
                      f"{answer['duplicates']} duplicates to drop at cosine >= {limit:g}")
        err.print(f"wrote {out}")
        return

    def load(local: Local) -> vectors.VectorTable:
        with local.session_factory() as s:
            return vectors.job_vectors(s, local.store, job_id=str(job_id),
                                       tenant_id=local.tenant_id)

    if table is not None:
        if not table.is_file():
            raise fail(f"no such file: {table}")
        try:
            vt = vectors.read_table(table)
        except Exception as exc:  # a broken table is the user's to fix: say why, no trace
            raise fail(f"{table}: {exc}") from None
    else:
        vt = embedded(load)
    try:
        groups = vectors.group(vt, limit, method)
    except Exception as exc:
        raise fail(str(getattr(exc, "message", exc))) from None
    vectors.write_groups(vt, groups, out)
    exact = sum(1 for g in groups for e in g.exact[1:] if e)
    dropped = sum(len(g.rows) - 1 for g in groups)
    console.print(f"{len(vt)} vectors: {len(groups)} groups, {dropped} duplicates to drop "
                  f"({exact} exact, {dropped - exact} near) at cosine >= {limit:g}")
    err.print(f"wrote {out}")


def _write_records(records: list[dict[str, object]], out: Path) -> None:
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), out)
        return
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                   encoding="utf-8")


def register(app: typer.Typer) -> None:
    app.command()(dedupe)
