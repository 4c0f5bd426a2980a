"""Studies and series."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from pacsnode.api.deps import AdminDep, EngineDep, ReadDep
from pacsnode.api.routes.common import DicomDate, Limit, Offset, Text, audited, page_out
from pacsnode.api.schemas import ActionPublic, PagePublic
from pacsnode.core.errors import NotFound
from pacsnode.db.admin import reprocess_study
from pacsnode.db.queries import (
    STUDY_STATUSES,
    SeriesSummary,
    StudyFilter,
    StudySummary,
    get_study,
    list_series,
    list_studies,
)

router = APIRouter(tags=["studies"])

Status = Annotated[str | None, Query(pattern="^(" + "|".join(STUDY_STATUSES) + ")$")]
UID = Annotated[str, Query(max_length=64)]


@router.get("/studies", response_model=PagePublic[StudySummary])
def studies(
    principal: ReadDep,
    engine: EngineDep,
    patient_id: Text = None,
    accession_number: Text = None,
    modality: Annotated[str | None, Query(max_length=16)] = None,
    date_from: DicomDate = None,
    date_to: DicomDate = None,
    status: Status = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Any:
    """Received studies, most recently received first."""
    flt = StudyFilter(patient_id, accession_number, modality, date_from, date_to, status)
    detail = {**flt.__dict__, "limit": limit, "offset": offset}
    with audited(engine, principal, "studies.read", detail=detail) as conn:
        return page_out(list_studies(conn, flt, limit=limit, offset=offset))


@router.get("/studies/{study_instance_uid}", response_model=StudySummary)
def study(principal: ReadDep, engine: EngineDep, study_instance_uid: str) -> Any:
    with audited(engine, principal, "studies.read", target=study_instance_uid[:64]) as conn:
        found = get_study(conn, study_instance_uid)
    if found is None:
        raise NotFound("study not found")
    return found


@router.post("/studies/{study_instance_uid}/reprocess", response_model=ActionPublic)
def reprocess(principal: AdminDep, engine: EngineDep, study_instance_uid: str) -> Any:
    """Write a new pending job for the study; the dispatcher queues it (404
    for an unknown study)."""
    with audited(engine, principal, "studies.reprocess", target=study_instance_uid) as conn:
        job_id = reprocess_study(conn, study_instance_uid)
    return ActionPublic(action="reprocess", count=1, ids=[job_id])


@router.get("/series", response_model=PagePublic[SeriesSummary])
def series(
    principal: ReadDep,
    engine: EngineDep,
    study_instance_uid: Annotated[str | None, Query(max_length=64)] = None,
    modality: Annotated[str | None, Query(max_length=16)] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Any:
    detail = {"study_instance_uid": study_instance_uid, "modality": modality}
    with audited(engine, principal, "series.read", detail=detail) as conn:
        return page_out(
            list_series(
                conn,
                study_instance_uid=study_instance_uid,
                modality=modality,
                limit=limit,
                offset=offset,
            )
        )
