"""GET /v1/models: model names the API knows plus the versions workers registered."""

from __future__ import annotations

from fastapi import APIRouter

from api import service
from api.deps import CallerDep, SessionDep, SettingsDep
from api.schemas import ModelList, ModelOut

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models")
def list_models(session: SessionDep, settings: SettingsDep, caller: CallerDep) -> ModelList:
    """Known model names, every version (weights sha256) a worker has run, and the caller's
    own fine-tuned models with their training lineage and held-out scores."""
    found = service.known_models(session, settings.default_model, caller.tenant_id)
    return ModelList(models=[ModelOut(**entry) for entry in found.values()])
