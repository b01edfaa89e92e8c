"""FastAPI dependencies: the runtime (settings, sessions, store, publisher) and the caller's tenant."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from loom.config import Settings
from loom.errors import Unauthorized

log = logging.getLogger("loom.api")


def default_publish(chunk: Any) -> None:
    """Publish one chunk message through the torch-free Celery app (imported on first use)."""
    from worker.app import publish_chunk

    publish_chunk(chunk)


@dataclass
class Runtime:
    """Everything a request needs, built once per app by ``api.main.create_app``."""

    settings: Settings
    engine: Any
    session_factory: sessionmaker[Session]
    store: Any
    publish: Callable[[Any], None] = default_publish
    _local_tenant_id: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def local_tenant_id(self) -> str:
        """The tenant used when LOOM_AUTH=off (created on first use)."""
        if self._local_tenant_id is None:
            from loom import tenants

            with self._lock, self.session_factory() as session:
                tenant = tenants.ensure_tenant(session, name=tenants.DEFAULT_TENANT)
                session.commit()
                self._local_tenant_id = tenant.id
        return self._local_tenant_id


@dataclass(frozen=True)
class Caller:
    tenant_id: str


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_settings(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Settings:
    return runtime.settings


def get_session(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Iterator[Session]:
    session = runtime.session_factory()
    try:
        yield session
    finally:
        session.close()


bearer = HTTPBearer(auto_error=False, description="An API key from `loom keys create`.")


def get_caller(
    runtime: Annotated[Runtime, Depends(get_runtime)],
    session: Annotated[Session, Depends(get_session)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    if not runtime.settings.auth_enabled:
        return Caller(tenant_id=runtime.local_tenant_id())
    if credentials is None or not credentials.credentials:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    from loom import tenants

    tenant = tenants.authenticate(session, secret=credentials.credentials)
    if tenant is None:
        raise Unauthorized("invalid or revoked API key")
    return Caller(tenant_id=tenant.id)


UI_COOKIE = "loom_key"


def get_viewer(
    request: Request,
    runtime: Annotated[Runtime, Depends(get_runtime)],
    session: Annotated[Session, Depends(get_session)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    """Like ``get_caller``, but also takes the page's login cookie (an HttpOnly, SameSite=Strict
    cookie holding the API key): the job page and its event stream (EventSource cannot send an
    Authorization header). Only GET routes and the page's own forms use it."""
    cookie = request.cookies.get(UI_COOKIE)
    if credentials is None and cookie and runtime.settings.auth_enabled:
        credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=cookie)
    return get_caller(runtime, session, credentials)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SessionDep = Annotated[Session, Depends(get_session)]
CallerDep = Annotated[Caller, Depends(get_caller)]
ViewerDep = Annotated[Caller, Depends(get_viewer)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
