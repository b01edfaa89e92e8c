"""``loom verify JOB [--repair]``: are the job's outputs still in the store, byte for byte?

Thin: the check is ``loom.jobs.verify_job`` (embedded) or ``POST /v1/jobs/{id}/verify`` (remote).
Exit status 1 when outputs are missing or corrupt and were not repaired."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from loom.cli.common import ApiOpt, KeyOpt, Local, console, embedded, err, remote, resolve


def _print_report(report: dict[str, Any], limit: int = 20) -> None:
    console.print(
        f"job {report['job_id']}: checked {report['checked']} outputs, "
        f"{report['missing']} missing, {report['corrupt']} corrupt"
        + (f", requeued {report['requeued']} items" if report.get("requeued") else "")
    )
    for p in report["problems"][:limit]:
        extra = (f" (sha256 {p['actual_sha256']}, expected {p['expected_sha256']})"
                 if p["problem"] == "corrupt" else "")
        err.print(f"  #{p['index']} {p['problem']}: {p['storage_key'] or '(text)'}{extra}")
    if len(report["problems"]) > limit:
        err.print(f"  ... and {len(report['problems']) - limit} more")


def verify(
    job_id: str,
    repair: Annotated[
        bool, typer.Option("--repair", help="Requeue exactly the items whose output is lost.")
    ] = False,
    api: ApiOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Check every output object's existence and sha256; --repair requeues the broken items."""
    if api:
        report = remote(lambda c: c.verify(job_id, repair=repair), api, api_key)["report"]
    else:

        def run(local: Local) -> dict[str, Any]:
            from loom import jobs

            with local.session_factory() as s:
                return jobs.verify_job(s, job_id=resolve(local, job_id), store=local.store,
                                       tenant_id=local.tenant_id, repair=repair).to_dict()

        report = embedded(run)
    _print_report(report)
    if report["requeued"] and not api:
        console.print(f"run them again with: loom run {report['job_id']}")
    if report["problems"] and not report["requeued"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``loom verify`` to ``app``."""
    app.command()(verify)
