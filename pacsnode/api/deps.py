"""Dependencies of the API routes: settings, engine, and who is calling.

Authentication is a bearer token (``Authorization: Bearer <token>``) or,
for the dashboard, the same token in the ``pacsnode_token`` cookie its login
form sets (HttpOnly, SameSite=Strict). Tokens are looked up by their SHA-256
(:mod:`db.tokens`); ``api.bootstrap_token`` from the configuration is an
admin token too. No token or an unknown one → 401; a read-only token on an
admin action → 403; a ``store`` token (DICOMweb STOW-RS only) anywhere else
→ 403. Every refusal is audited.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy import Engine

from pacsnode.core.settings import Settings
from pacsnode.db import audit
from pacsnode.db.tokens import lookup

COOKIE = "pacsnode_token"
VIEW_ROLES = ("read", "admin")
STORE_ROLES = ("store", "admin")


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: a token's name and role, and the client's address."""

    name: str
    role: str
    source: str

    @property
    def actor(self) -> audit.Actor:
        return audit.Actor("api", f"token:{self.name}", self.source)


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def _token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(COOKIE) or None


def authenticate(request: Request, settings: Settings, engine: Engine) -> Principal | None:
    token = _token(request)
    if token is None:
        return None
    return check_token(token, client_address(request), settings, engine)


def check_token(token: str, source: str, settings: Settings, engine: Engine) -> Principal | None:
    """The caller holding ``token``, or None when it is unknown or revoked."""
    bootstrap = settings.api.bootstrap_token
    if bootstrap and hmac.compare_digest(token.encode(), bootstrap.encode()):
        return Principal("bootstrap", "admin", source)
    with engine.connect() as conn:
        info = lookup(conn, token)
    return None if info is None else Principal(info.name, info.role, source)


def _deny(request: Request, engine: Engine, code: int, actor: str, why: str) -> HTTPException:
    with engine.begin() as conn:
        audit.record(
            conn,
            audit.Actor("api", actor, client_address(request)),
            f"{request.method} {request.url.path}",
            outcome="denied",
            detail={"status": code},
        )
    headers = {"WWW-Authenticate": "Bearer"} if code == status.HTTP_401_UNAUTHORIZED else None
    return HTTPException(code, detail=why, headers=headers)


def require_read(request: Request, settings: SettingsDep, engine: EngineDep) -> Principal:
    principal = authenticate(request, settings, engine)
    if principal is None:
        raise _deny(
            request, engine, 401, "anonymous", "a valid bearer token is required (see docs/api.md)"
        )
    if principal.role not in VIEW_ROLES:
        raise _deny(
            request,
            engine,
            403,
            f"token:{principal.name}",
            f"a {principal.role} token cannot read: this needs a read or admin token",
        )
    return principal


def require_store(request: Request, settings: SettingsDep, engine: EngineDep) -> Principal:
    """DICOMweb STOW-RS: a ``store`` or ``admin`` token."""
    principal = authenticate(request, settings, engine)
    if principal is None:
        raise _deny(
            request, engine, 401, "anonymous", "a valid bearer token is required (see docs/api.md)"
        )
    if principal.role not in STORE_ROLES:
        raise _deny(
            request,
            engine,
            403,
            f"token:{principal.name}",
            f"a {principal.role} token cannot store: this needs a store or admin token",
        )
    return principal


def require_admin(
    request: Request, principal: Annotated[Principal, Depends(require_read)], engine: EngineDep
) -> Principal:
    if principal.role != "admin":
        raise _deny(
            request, engine, 403, f"token:{principal.name}", "this action needs an admin token"
        )
    return principal


ReadDep = Annotated[Principal, Depends(require_read)]
AdminDep = Annotated[Principal, Depends(require_admin)]
StoreDep = Annotated[Principal, Depends(require_store)]
