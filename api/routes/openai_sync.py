"""/openai/v1 chat completions, embeddings, image generation and models: each request is a
Loom job of its own (``api.openai_service.run``), answered when it finishes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request
from fastapi.responses import JSONResponse

from api import openai_service, service
from api.deps import CallerDep, RuntimeDep, SessionDep, SettingsDep
from loom import openai_compat
from loom.errors import NotFound
from loom.openai_replies import model_list, model_object

router = APIRouter()
JsonBody = Annotated[dict[str, Any], Body()]


async def _serve(request: Request, rt: Any, session: Any, tenant_id: str, endpoint: str,
                 body: dict[str, Any]) -> JSONResponse:
    # Authentication is done: the request's own session holds no connection while it waits.
    session.close()
    status, reply, job_id = await openai_service.run(
        rt, request.app.state.waiter, tenant_id=tenant_id, endpoint=endpoint, body=body)
    return JSONResponse(reply, status_code=status, headers={"x-loom-job-id": job_id})


@router.post("/chat/completions")
async def chat_completions(body: JsonBody, request: Request, rt: RuntimeDep,
                           session: SessionDep, caller: CallerDep) -> JSONResponse:
    """A caption (an image and an instruction, or none) or an answer (an image and a
    question) as a chat.completion."""
    return await _serve(request, rt, session, caller.tenant_id, openai_compat.CHAT, body)


@router.post("/embeddings")
async def embeddings(body: JsonBody, request: Request, rt: RuntimeDep, session: SessionDep,
                     caller: CallerDep) -> JSONResponse:
    """Image embeddings: each input is an image URL (data: or http(s))."""
    return await _serve(request, rt, session, caller.tenant_id, openai_compat.EMBEDDINGS, body)


@router.post("/images/generations")
async def images_generations(body: JsonBody, request: Request, rt: RuntimeDep,
                             session: SessionDep, caller: CallerDep) -> JSONResponse:
    """``n`` images for a prompt, as b64_json."""
    return await _serve(request, rt, session, caller.tenant_id, openai_compat.IMAGES, body)


@router.get("/models")
def list_models(session: SessionDep, settings: SettingsDep, caller: CallerDep) -> dict[str, Any]:
    """The models Loom knows (their ids are what ``model`` takes)."""
    return model_list(service.known_models(session, settings.default_model, caller.tenant_id))


@router.get("/models/{model_id:path}")
def get_model(model_id: Annotated[str, Path(max_length=2000)], session: SessionDep,
              settings: SettingsDep, caller: CallerDep) -> dict[str, Any]:
    known = service.known_models(session, settings.default_model, caller.tenant_id)
    if model_id not in known:
        raise NotFound(f"model {model_id!r} does not exist", code="model_not_found")
    return model_object(model_id)
