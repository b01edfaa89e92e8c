"""Tenants and API keys.

Secrets look like ``loom_<43 url-safe chars>`` and are shown once. Only their SHA-256 is stored
(a leaked database does not leak usable keys); the first characters are kept as an indexed prefix
so that authentication is one indexed lookup plus a constant-time comparison.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from loom.db import begin_write
from loom.errors import InvalidRequest, NotFound
from loom.models import ApiKey, Tenant, utcnow

DEFAULT_TENANT = "local"
SECRET_PREFIX = "loom_"
PREFIX_LEN = 12  # "loom_" + 7 random chars: selective enough, reveals little


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def ensure_tenant(session: Session, *, name: str) -> Tenant:
    """Get or create the tenant called ``name`` (safe against a concurrent create)."""
    name = name.strip()
    if not name:
        raise InvalidRequest("tenant name must not be empty")
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is not None:
        return tenant
    tenant = Tenant(name=name)
    session.add(tenant)
    try:
        session.commit()
    except IntegrityError:
        # Someone else created it between our SELECT and INSERT: use theirs.
        session.rollback()
        tenant = session.scalar(select(Tenant).where(Tenant.name == name))
        if tenant is None:
            raise
    return tenant


def get_tenant(session: Session, *, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise NotFound(f"no tenant named {name!r}")
    return tenant


def create_api_key(
    session: Session, *, tenant_name: str, name: str | None = None
) -> tuple[ApiKey, str]:
    """Create a key for the tenant (created if needed). Returns (row, secret); the secret is
    not stored anywhere and cannot be shown again."""
    tenant = ensure_tenant(session, name=tenant_name)
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        tenant_id=tenant.id, prefix=secret[:PREFIX_LEN], key_hash=hash_secret(secret), name=name
    )
    session.add(key)
    session.commit()
    return key, secret


def revoke_api_key(session: Session, *, key_id: str) -> None:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"no API key {key_id!r}")
    key.revoked_at = utcnow()
    session.commit()


def authenticate(session: Session, *, secret: str) -> Tenant | None:
    """The tenant owning ``secret``, or None (unknown, malformed or revoked key)."""
    if not secret.startswith(SECRET_PREFIX) or len(secret) < PREFIX_LEN + 8 or len(secret) > 200:
        return None
    candidate = hash_secret(secret)
    rows = session.scalars(
        select(ApiKey).where(ApiKey.prefix == secret[:PREFIX_LEN], ApiKey.revoked_at.is_(None))
    ).all()
    found: ApiKey | None = None
    for row in rows:
        # Constant-time comparison: response timing must not reveal how much of a hash matched.
        if hmac.compare_digest(row.key_hash, candidate):
            found = row
    if found is None:
        return None
    return session.get(Tenant, found.tenant_id)


def webhook_secret(session: Session, *, tenant_id: str) -> str:
    """The tenant's webhook signing secret (Standard Webhooks: ``whsec_`` + base64 of 24
    bytes), made on first use; two first uses at once agree on one."""
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id!r}")
    if tenant.webhook_secret:
        return tenant.webhook_secret
    begin_write(session)
    candidate = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    session.execute(update(Tenant).where(Tenant.id == tenant_id, Tenant.webhook_secret.is_(None))
                    .values(webhook_secret=candidate))
    session.commit()
    secret = session.scalar(select(Tenant.webhook_secret).where(Tenant.id == tenant_id))
    assert secret
    return secret
