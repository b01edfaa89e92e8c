"""The job page at /ui: server-rendered Jinja2 templates (api/templates) and a little plain JS
(api/static/app.js). Thin: every read goes through loom.jobs (page.py, stream.py, queries).

Auth: POST /ui/login with an API key sets an HttpOnly, SameSite=Strict cookie holding the key;
every page re-authenticates it (a revoked key stops working at once). Tenant-scoped exactly like
the API: another tenant's job, item or thumbnail is a 404.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from api import service
from api.deps import UI_COOKIE, Runtime, RuntimeDep, SessionDep
from loom import jobs as core
from loom import results as results_out
from loom.errors import InputMissing, InvalidRequest, NotFound, Unauthorized
from loom.jobs import page
from loom.models import JobStatus

HERE = Path(__file__).resolve().parents[1]
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(prefix="/ui", include_in_schema=False)
THUMB_PIXELS = 256


def _tenant(request: Request, rt: Runtime, session: Session) -> str | None:
    """The viewer's tenant, or None when not logged in."""
    if not rt.settings.auth_enabled:
        return rt.local_tenant_id()
    secret = request.cookies.get(UI_COOKIE)
    if not secret:
        return None
    from loom import tenants

    tenant = tenants.authenticate(session, secret=secret)
    session.commit()
    return tenant.id if tenant else None


def _need(request: Request, rt: Runtime, session: Session) -> str:
    tenant_id = _tenant(request, rt, session)
    if tenant_id is None:
        raise Unauthorized("log in at /ui/login")
    return tenant_id


def _same_origin(request: Request) -> None:
    """The forms' CSRF check on top of SameSite=Strict: an Origin header must be our own."""
    origin = request.headers.get("origin")
    if origin and origin.rstrip("/") != str(request.base_url).rstrip("/"):
        raise InvalidRequest("cross-origin form post refused")


def _render(request: Request, name: str, **ctx: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, ctx)


@router.get("", response_class=HTMLResponse)
def index() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, error: str | None = None) -> HTMLResponse:
    return _render(request, "login.html", error=error)


@router.post("/login")
def login(request: Request, rt: RuntimeDep, session: SessionDep,
          api_key: Annotated[str, Form(max_length=200)]) -> Response:
    from loom import tenants

    _same_origin(request)
    if tenants.authenticate(session, secret=api_key.strip()) is None:
        return _render(request, "login.html", error="invalid or revoked API key")
    response = RedirectResponse("/ui/jobs", status_code=303)
    response.set_cookie(UI_COOKIE, api_key.strip(), httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/", max_age=12 * 3600)
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(UI_COOKIE, path="/")
    return response


@router.get("/jobs", response_class=HTMLResponse)
def jobs_list(request: Request, rt: RuntimeDep, session: SessionDep,
              status: Annotated[JobStatus | None, Query()] = None,
              task: Annotated[str | None, Query(max_length=20)] = None,
              cursor: Annotated[str | None, Query(max_length=200)] = None) -> Response:
    tenant_id = _tenant(request, rt, session)
    if tenant_id is None:
        return RedirectResponse("/ui/login", status_code=303)
    rows, next_cursor = page.jobs_overview(
        session, tenant_id=tenant_id, status=status.value if status else None,
        task=task or None, cursor=cursor)
    return _render(request, "jobs.html", jobs=rows, next_cursor=next_cursor,
                   status=status.value if status else "", task=task or "",
                   statuses=[s.value for s in JobStatus], auth=rt.settings.auth_enabled)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, request: Request, rt: RuntimeDep, session: SessionDep) -> Response:
    tenant_id = _tenant(request, rt, session)
    if tenant_id is None:
        return RedirectResponse("/ui/login", status_code=303)
    job = core.get_job(session, job_id=job_id, tenant_id=tenant_id)
    info = core.job_dict(job, core.job_progress(session, job_id=job.id), core.queue_place(
        session, job=job, defaults=core.Limits.from_settings(rt.settings)))
    parents = []
    if job.parent_job_id:
        parents = [core.get_job(session, job_id=job.parent_job_id, tenant_id=tenant_id)]
    return _render(request, "job.html", job=info, formats=results_out.TEXT_FORMATS, parents=parents,
                   samples=page.samples(session, job_id=job.id, tenant_id=tenant_id),
                   data=_data(session, job.id, tenant_id), auth=rt.settings.auth_enabled)


def _data(session: Session, job_id: str, tenant_id: str) -> dict[str, Any]:
    return {
        "throughput": page.throughput(session, job_id=job_id, tenant_id=tenant_id),
        "stages": page.stage_timings(session, job_id=job_id, tenant_id=tenant_id),
        "failures": page.failures(session, job_id=job_id, tenant_id=tenant_id),
        "webhooks": [{**d, "next_attempt_at": str(d["next_attempt_at"] or ""),
                      "created_at": str(d["created_at"])}
                     for d in core.job_deliveries(session, job_id=job_id)],
    }


@router.get("/jobs/{job_id}/data")
def job_data(job_id: str, request: Request, rt: RuntimeDep, session: SessionDep) -> JSONResponse:
    """The page's charts and tables, refreshed by app.js while the job runs."""
    tenant_id = _need(request, rt, session)
    core.get_job(session, job_id=job_id, tenant_id=tenant_id)
    samples = page.samples(session, job_id=job_id, tenant_id=tenant_id)
    return JSONResponse({**_data(session, job_id, tenant_id), "samples": [
        {"item_id": s["item_id"], "index": s["index"],
         "text": (s["output"] or {}).get("text"), "kind": (s["output"] or {}).get("kind"),
         "prompt": s["input"].get("prompt") or s["input"].get("question"),
         "seed": (s["lineage"] or {}).get("seed"),
         "has_input": bool(s["input"].get("image_key"))} for s in samples]})


@router.post("/jobs/{job_id}/{action}")
def job_action(job_id: str, action: str, request: Request, rt: RuntimeDep,
               session: SessionDep, background: BackgroundTasks) -> Response:
    tenant_id = _need(request, rt, session)
    _same_origin(request)
    if action == "cancel":
        service.cancel(session, rt, job_id=job_id, tenant_id=tenant_id, background=background)
    elif action == "retry":
        n = service.retrying(session, lambda: core.retry_failed(
            session, job_id=job_id, tenant_id=tenant_id))
        if n:
            service.publish(session, rt, job_id)
    else:
        raise NotFound(f"no action {action!r}")
    return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)


@router.get("/items/{item_id}", response_class=HTMLResponse)
def item_page(item_id: int, request: Request, rt: RuntimeDep, session: SessionDep) -> Response:
    tenant_id = _tenant(request, rt, session)
    if tenant_id is None:
        return RedirectResponse("/ui/login", status_code=303)
    lineage = core.item_lineage(session, item_id=item_id, tenant_id=tenant_id)
    return _render(request, "item.html", lin=lineage, auth=rt.settings.auth_enabled)


@router.get("/items/{item_id}/thumb")
def thumbnail(item_id: int, request: Request, rt: RuntimeDep, session: SessionDep,
              which: Annotated[str, Query(pattern="^(input|output)$")] = "input",
              full: bool = False) -> Response:
    """The item's input image (or image output) read from the tenant's own storage and served
    through the API (never a public URL); downscaled to a thumbnail unless ``full``."""
    from PIL import Image

    tenant_id = _need(request, rt, session)
    key, content_type = page.item_image_key(session, item_id=item_id, tenant_id=tenant_id,
                                            which=which)
    try:
        data = rt.store.get(key)
    except InputMissing:
        raise NotFound(f"item {item_id}: its {which} object is gone from storage") from None
    headers = {"Cache-Control": "private, max-age=300"}
    if full:
        return Response(data, media_type=content_type or "application/octet-stream",
                        headers=headers)
    from loom import media

    image = media.decode_image(data, max_pixels=rt.settings.max_image_pixels)
    image.thumbnail((THUMB_PIXELS, THUMB_PIXELS), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png", headers=headers)
