"""/v1/admin: tenant limits, weights and what each tenant uses now. Not an API key's business (a
key is one tenant): it takes LOOM_ADMIN_TOKEN as its Bearer, and is off (404) with auth on and no
token set, open with auth off (one local tenant) unless a token is set."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from api.deps import RuntimeDep, SessionDep, SettingsDep
from api.schemas import ErrorResponse
from loom import jobs
from loom.errors import NotFound, Unauthorized
from loom.models import utcnow

admin_bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken",
                          description="LOOM_ADMIN_TOKEN (not an API key).")


def require_admin_token(
    rt: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(admin_bearer)],
) -> None:
    token = rt.settings.admin_token
    if not token:
        if rt.settings.auth_enabled:
            raise NotFound("/v1/admin is off: set LOOM_ADMIN_TOKEN to use it")
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("/v1/admin needs 'Authorization: Bearer <LOOM_ADMIN_TOKEN>'")


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong LOOM_ADMIN_TOKEN"},
    404: {"model": ErrorResponse, "description": "No such tenant, or the admin API is off"},
    422: {"model": ErrorResponse, "description": "Invalid limit"},
}
router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=ERRORS,
                   dependencies=[Depends(require_admin_token)])
TenantName = Annotated[str, Path(max_length=200)]


class LimitsOut(BaseModel):
    max_queued_items: int | None
    max_running_items: int | None
    submissions_per_minute: int | None
    max_items_per_job: int | None
    weight: float


class UseOut(BaseModel):
    open_items: int
    running_items: int
    submissions_last_minute: int


class TenantOut(BaseModel):
    id: str
    name: str
    limits: LimitsOut = Field(description="In effect: the tenant's overrides over the defaults")
    overrides: dict[str, Any]
    use: UseOut


class TenantList(BaseModel):
    tenants: list[TenantOut]


class LimitsIn(BaseModel):
    """Overrides to set; null clears one (back to the default); ``reset`` clears all first."""

    max_queued_items: int | None = Field(default=None, ge=1)
    max_running_items: int | None = Field(default=None, ge=1)
    submissions_per_minute: int | None = Field(default=None, ge=1)
    max_items_per_job: int | None = Field(default=None, ge=1)
    weight: float | None = Field(default=None, gt=0)
    reset: bool = False


def _out(t: jobs.TenantLimits) -> TenantOut:
    return TenantOut(id=t.tenant_id, name=t.name, limits=LimitsOut(**vars(t.limits)),
                     overrides=t.overrides, use=UseOut(**vars(t.use)))


@router.get("/tenants")
def list_tenants(session: SessionDep, settings: SettingsDep) -> TenantList:
    """Every tenant with its limits in effect and its use now."""
    found = jobs.list_limits(session, defaults=jobs.Limits.from_settings(settings), now=utcnow())
    return TenantList(tenants=[_out(t) for t in found])


@router.get("/tenants/{name}")
def get_tenant(name: TenantName, session: SessionDep, settings: SettingsDep) -> TenantOut:
    found = jobs.list_limits(session, defaults=jobs.Limits.from_settings(settings),
                             now=utcnow(), tenant_name=name)
    return _out(found[0])


@router.patch("/tenants/{name}/limits")
def set_limits(name: TenantName, body: LimitsIn, session: SessionDep,
               settings: SettingsDep) -> TenantOut:
    """Set a tenant's limits and weight (only the fields sent; null clears one)."""
    changes = body.model_dump(exclude_unset=True, exclude={"reset"})
    jobs.set_limits(session, tenant_name=name, changes=changes, reset=body.reset)
    return get_tenant(name, session, settings)
