"""Node statistics and the audit trail."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query

from pacsnode.api.deps import AdminDep, EngineDep, ReadDep
from pacsnode.api.routes.common import Limit, Offset, audited, page_out
from pacsnode.api.schemas import PagePublic, StatsPublic
from pacsnode.db.audit import CHANNELS, AuditRow, list_events
from pacsnode.db.stats import stats as node_stats

router = APIRouter(tags=["stats"])


@router.get("/stats", response_model=StatsPublic)
def stats(principal: ReadDep, engine: EngineDep) -> Any:
    """Counts, throughput, and p50/p95 latency per pipeline stage and per model."""
    with audited(engine, principal, "stats.read") as conn:
        return node_stats(conn).as_json()


Channel = Annotated[str | None, Query(pattern="^(" + "|".join(CHANNELS) + ")$")]


@router.get("/audit", response_model=PagePublic[AuditRow], tags=["audit"])
def audit_trail(
    principal: AdminDep,
    engine: EngineDep,
    channel: Channel = None,
    actor: Annotated[str | None, Query(max_length=96)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Any:
    """The audit trail, newest first (admin tokens only)."""
    since = since.replace(tzinfo=UTC) if since and since.tzinfo is None else since
    until = until.replace(tzinfo=UTC) if until and until.tzinfo is None else until
    detail = {"channel": channel, "actor": actor, "action": action, "since": since, "until": until}
    with audited(engine, principal, "audit.read", detail=detail) as conn:
        rows, total = list_events(
            conn,
            channel=channel,
            actor=actor,
            action=action,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
        )
    from pacsnode.db.queries import Page

    return page_out(Page(rows, total, limit, offset))
