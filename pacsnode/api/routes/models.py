"""Installed models: list, enable, disable (persisted as a switch in the
database; workers apply it to every job that starts afterwards, see
:mod:`db.modelswitch`). The bundled models are for demonstration and
testing, not clinical use."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from pacsnode.api.deps import AdminDep, EngineDep, ReadDep, SettingsDep
from pacsnode.api.routes.common import Limit, Offset, audited
from pacsnode.api.schemas import ActionPublic, PagePublic
from pacsnode.db.modelswitch import list_models, switch_model

router = APIRouter(tags=["models"])


@router.get("/models", response_model=PagePublic[dict[str, Any]])
def models(
    principal: ReadDep,
    engine: EngineDep,
    settings: SettingsDep,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Any:
    """Installed models and whether the next job will run them."""
    with audited(engine, principal, "models.read") as conn:
        rows = list_models(conn, settings)
    items = [r.as_json() for r in rows[offset : offset + limit]]
    return {"items": items, "total": len(rows), "limit": limit, "offset": offset}


Version = Annotated[str, Query(max_length=32, description="one version; all when empty")]


def _switch(
    principal: Any, engine: Any, settings: Any, name: str, version: str, enabled: bool
) -> ActionPublic:
    action = "models.enable" if enabled else "models.disable"
    target = f"{name}@{version}" if version else name
    # An unknown model raises ModelConfigError: 409 (pacsnode.api.errors).
    with audited(engine, principal, action, target=target[:128]) as conn:
        switch_model(conn, settings, name, version, enabled, principal.actor.name)
    return ActionPublic(action=action, count=1)


@router.post("/models/{name}/enable", response_model=ActionPublic)
def enable(
    principal: AdminDep, engine: EngineDep, settings: SettingsDep, name: str, version: Version = ""
) -> Any:
    return _switch(principal, engine, settings, name, version, True)


@router.post("/models/{name}/disable", response_model=ActionPublic)
def disable(
    principal: AdminDep, engine: EngineDep, settings: SettingsDep, name: str, version: Version = ""
) -> Any:
    return _switch(principal, engine, settings, name, version, False)
