"""/v1/usage: the caller's usage per UTC day and model (loom.jobs.usage)."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Query

from api.deps import CallerDep, SessionDep
from api.schemas import ErrorResponse, UsageOut
from loom import jobs as core

router = APIRouter(prefix="/v1", tags=["usage"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    422: {"model": ErrorResponse,
          "description": "Not an ISO date, since after until, or over 366 days"},
}


@router.get("/usage", responses=ERRORS)
def usage(
    session: SessionDep,
    caller: CallerDep,
    since: Annotated[date | None, Query(
        description="First UTC day (YYYY-MM-DD); default: 29 days before until.")] = None,
    until: Annotated[date | None, Query(
        description="Last UTC day, inclusive; default: today.")] = None,
    model: Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00-\x1f]*$",
                                       description="Only this model.")] = None,
) -> UsageOut:
    """Your tenant's items by status, model-seconds and bytes stored, per UTC day and model
    (``loom usage``). Another tenant's usage is never shown."""
    report = core.usage_report(session, tenant_id=caller.tenant_id, since=since, until=until,
                               model=model)
    return UsageOut.model_validate(report)
