"""Exports (C-STORE of results to destinations): list, retry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query

from pacsnode.api.deps import AdminDep, EngineDep, ReadDep, SettingsDep
from pacsnode.api.routes.common import Limit, Offset, audited, page_out
from pacsnode.api.schemas import ActionPublic, ExportRetryCreate, PagePublic
from pacsnode.db.admin import page_exports
from pacsnode.db.exports import STATES, ExportRow, known_destinations, retry_exports

router = APIRouter(tags=["exports"])

State = Annotated[str | None, Query(pattern="^(" + "|".join(STATES) + ")$")]


@router.get("/exports", response_model=PagePublic[ExportRow])
def exports(
    principal: ReadDep,
    engine: EngineDep,
    state: State = None,
    destination: Annotated[str | None, Query(max_length=64)] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Any:
    """Exports, newest first (one row per output object and destination)."""
    detail = {"state": state, "destination": destination}
    with audited(engine, principal, "exports.read", detail=detail) as conn:
        page = page_exports(conn, state=state, destination=destination, limit=limit, offset=offset)
    return page_out(page)


@router.post("/exports/retry", response_model=ActionPublic)
def retry(
    principal: AdminDep, engine: EngineDep, settings: SettingsDep, body: ExportRetryCreate
) -> Any:
    """Re-queue exports with a new deadline; a worker sends them soon."""
    now = datetime.now(UTC)
    detail: dict[str, Any] = body.model_dump()
    with audited(engine, principal, "exports.retry", detail=detail) as conn:
        count = detail["count"] = retry_exports(
            conn,
            now=now,
            deadline=now + timedelta(seconds=settings.exports.deadline_s),
            ids=body.ids,
            state=body.state,
            destination=body.destination,
            refresh=known_destinations(settings),
        )
    return ActionPublic(action="retry", count=count)
