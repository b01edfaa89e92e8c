"""/v1/models: model names the API knows plus the versions workers registered; a tenant's names
for models brought by reference (POST, DELETE)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, status

from api import service
from api.deps import CallerDep, SessionDep, SettingsDep
from api.schemas import ErrorResponse, ModelAliasIn, ModelList, ModelOut
from loom import jobs, tasks
from loom.errors import InvalidRequest

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "No such model name in your tenant"},
    422: {"model": ErrorResponse, "description": "Invalid request"},
}

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models")
def list_models(session: SessionDep, settings: SettingsDep, caller: CallerDep) -> ModelList:
    """Known model names, every version (weights sha256) a worker has run, and the caller's
    own fine-tuned models with their training lineage and held-out scores."""
    found = service.known_models(session, settings.default_model, caller.tenant_id)
    return ModelList(models=[ModelOut(**entry) for entry in found.values()])


@router.post("/models", status_code=status.HTTP_201_CREATED, responses=ERRORS)
def add_model(body: ModelAliasIn, session: SessionDep, caller: CallerDep) -> ModelOut:
    """Name a model brought by reference (``loom models add``); jobs then say ``model: NAME``
    and record the reference itself, the name's params under their own."""
    ref = jobs.alias_ref(body.backend, body.ref)
    checked: dict[str, object] = {}
    for key, value in body.params.items():
        spec = next((s for s in tasks.inference() if s.param(key) is not None), None)
        if spec is None:
            raise InvalidRequest(f"params.{key}: no task takes it")
        checked.update(spec.validate_params({key: value}))
    row = jobs.add_alias(session, tenant_id=caller.tenant_id, name=body.name, ref=ref,
                         params=checked)
    caps = tasks.caps_for(row.ref)
    return ModelOut(name=row.name, ref=row.ref, params=row.params or {},
                    tasks=list(caps.tasks) if caps else [])


@router.delete("/models/{name}", status_code=status.HTTP_204_NO_CONTENT, responses=ERRORS)
def remove_model(name: str, session: SessionDep, caller: CallerDep) -> None:
    jobs.remove_alias(session, tenant_id=caller.tenant_id, name=name)
