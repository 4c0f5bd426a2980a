"""Pipeline jobs: list, retry failed ones."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from pacsnode.api.deps import AdminDep, EngineDep, ReadDep
from pacsnode.api.routes.common import Limit, Offset, audited, page_out
from pacsnode.api.schemas import ActionPublic, JobRetryCreate, PagePublic
from pacsnode.core.errors import StateConflict
from pacsnode.db.admin import JOB_STATES, JobRow, list_jobs, retry_jobs

router = APIRouter(tags=["jobs"])

JobId = Annotated[int, Path(ge=1, le=2**31 - 1)]
State = Annotated[str | None, Query(pattern="^(" + "|".join(JOB_STATES) + ")$")]


@router.get("/jobs", response_model=PagePublic[JobRow])
def jobs(
    principal: ReadDep,
    engine: EngineDep,
    state: State = None,
    study_instance_uid: Annotated[str | None, Query(max_length=64)] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Any:
    """Jobs, newest first."""
    detail = {"state": state, "study_instance_uid": study_instance_uid}
    with audited(engine, principal, "jobs.read", detail=detail) as conn:
        page = list_jobs(
            conn, state=state, study_instance_uid=study_instance_uid, limit=limit, offset=offset
        )
    return page_out(page)


@router.post("/jobs/retry", response_model=ActionPublic)
def retry(principal: AdminDep, engine: EngineDep, body: JobRetryCreate) -> Any:
    """Failed jobs back to pending (all failed ones without ``ids``)."""
    detail: dict[str, Any] = {"asked": body.ids}
    with audited(engine, principal, "jobs.retry", detail=detail) as conn:
        ids = detail["ids"] = retry_jobs(conn, body.ids)
    return ActionPublic(action="retry", count=len(ids), ids=ids)


@router.post("/jobs/{job_id}/retry", response_model=ActionPublic)
def retry_one(principal: AdminDep, engine: EngineDep, job_id: JobId) -> Any:
    """One failed job back to pending; 409 if it is not failed."""
    with audited(engine, principal, "jobs.retry", target=f"job:{job_id}") as conn:
        ids = retry_jobs(conn, [job_id])
    if not ids:
        raise StateConflict(f"job {job_id} does not exist or has not failed")
    return ActionPublic(action="retry", count=1, ids=ids)
