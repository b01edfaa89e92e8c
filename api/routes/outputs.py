"""Output content (local store) and item lineage."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import Response

from api.deps import CallerDep, RuntimeDep, SessionDep
from api.schemas import ErrorResponse
from loom import jobs as core
from loom.errors import InputMissing, NotFound

router = APIRouter(prefix="/v1", tags=["results"])

RowId = Annotated[int, Path(ge=1, le=2**63 - 1)]

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "Not found in your tenant"},
}


@router.get(
    "/outputs/{output_id}/content",
    response_class=Response,
    responses={**ERRORS, 200: {"content": {"image/png": {}}, "description": "The output bytes"}},
)
def output_content(
    output_id: RowId, session: SessionDep, rt: RuntimeDep, caller: CallerDep
) -> Response:
    """The bytes of an image output (how a local store serves them; S3 hands out presigned URLs)."""
    output = core.get_output(session, output_id=output_id, tenant_id=caller.tenant_id)
    key = output.storage_key
    assert key is not None
    try:
        data = rt.store.get(key)
    except InputMissing:
        raise NotFound(f"output {output_id}: its object is gone from storage") from None
    return Response(data, media_type=output.content_type or "application/octet-stream")


@router.get("/items/{item_id}/lineage", responses=ERRORS)
def lineage(item_id: RowId, session: SessionDep, caller: CallerDep) -> dict[str, Any]:
    """Where an output came from: input sha256, model name/version/weights, params and seed,
    attempt, worker, timings, and the chain of parent jobs."""
    try:
        return core.item_lineage(session, item_id=item_id, tenant_id=caller.tenant_id)
    except NotFound:
        # One answer for "missing" and "another tenant's": never the other tenant's job id.
        raise NotFound(f"no item {item_id}") from None
