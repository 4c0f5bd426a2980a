"""Model results: classification findings, and segments with their measurements.

Every read is audited (who queried which results, with which filters).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query

from pacsnode.api.deps import EngineDep, ReadDep
from pacsnode.api.routes.common import Limit, Offset, Text, audited, page_out
from pacsnode.api.schemas import PagePublic
from pacsnode.core.errors import InvalidRequest
from pacsnode.db.admin import FindingRow, ResultFilter, SegmentRow, list_findings, list_segments

router = APIRouter(tags=["results"])

Probability = Annotated[float | None, Query(ge=0.0, le=1.0)]


def _filter(
    model: Text = None,
    version: Annotated[str | None, Query(max_length=32)] = None,
    label: Text = None,
    probability_min: Probability = None,
    probability_max: Probability = None,
    ood: bool | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    study_instance_uid: Text = None,
) -> ResultFilter:
    return ResultFilter(
        model,
        version,
        label,
        probability_min,
        probability_max,
        ood,
        _utc(since),
        _utc(until),
        study_instance_uid,
    )


def _utc(value: datetime | None) -> datetime | None:
    """A time without an offset is taken as UTC, as the node stores times."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


@router.get("/results/findings", response_model=PagePublic[FindingRow])
def findings(
    principal: ReadDep,
    engine: EngineDep,
    model: Text = None,
    version: Annotated[str | None, Query(max_length=32)] = None,
    label: Annotated[str | None, Query(max_length=64, description="code meaning or value")] = None,
    probability_min: Probability = None,
    probability_max: Probability = None,
    ood: Annotated[bool | None, Query(description="flagged out-of-distribution")] = None,
    since: Annotated[datetime | None, Query(description="created at or after")] = None,
    until: Annotated[datetime | None, Query(description="created before")] = None,
    study_instance_uid: Text = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Any:
    """Findings, newest first: e.g. ``model=lesion&label=Lesion&probability_min=0.8``."""
    flt = _filter(
        model,
        version,
        label,
        probability_min,
        probability_max,
        ood,
        since,
        until,
        study_instance_uid,
    )
    return _read("results.findings.read", principal, engine, flt, limit, offset, list_findings)


@router.get("/results/segments", response_model=PagePublic[SegmentRow])
def segments(
    principal: ReadDep,
    engine: EngineDep,
    model: Text = None,
    version: Annotated[str | None, Query(max_length=32)] = None,
    label: Annotated[str | None, Query(max_length=64, description="code meaning or value")] = None,
    ood: bool | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    study_instance_uid: Text = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Any:
    """Segments with their measurements (voxels, mm³, bounding box), newest first."""
    flt = _filter(model, version, label, None, None, ood, since, until, study_instance_uid)
    return _read("results.segments.read", principal, engine, flt, limit, offset, list_segments)


def _read(
    action: str, principal: Any, engine: Any, flt: ResultFilter, limit: int, offset: int, query: Any
) -> Any:
    if flt.since and flt.until and flt.since > flt.until:
        raise InvalidRequest("since is after until")
    detail = {**flt.__dict__, "limit": limit, "offset": offset}
    with audited(engine, principal, action, detail=detail) as conn:
        page = query(conn, flt, limit=limit, offset=offset)
        detail["returned"] = len(page.items)
    return page_out(page)
