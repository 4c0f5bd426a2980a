"""The query layer for jobs, results and exports, shared by the API, the CLI
and the dashboard (studies and series: :mod:`db.queries`).

Filters are bound parameters only. Operator actions (retry a job, reprocess
a study, retry exports) go through the outbox: they put ``job`` or
``export`` rows back to ``pending`` (or write a new pending job) through the
modules that own those lifecycles (:mod:`pacsnode.db.jobs`,
:mod:`pacsnode.db.exports`), and the dispatcher publishes them as it does
every other job; nothing here talks to the broker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, func, select

from pacsnode.core.errors import NotFound
from pacsnode.core.states import JobKind, JobState
from pacsnode.db import jobs
from pacsnode.db.exports import ExportRow, list_exports
from pacsnode.db.models import Assembly, Export, Finding, Job, Segment, Series, Study
from pacsnode.db.queries import Page, Row, orm

JOB_STATES = tuple(s.value for s in JobState)


# --- jobs ---------------------------------------------------------------------


@dataclass(frozen=True)
class JobRow(Row):
    id: int
    study_instance_uid: str
    series_instance_uid: str | None
    pipeline: str
    kind: str
    state: str
    attempts: int
    trigger_reason: str
    instances: int
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    error: str
    # While running: the worker holding it ("host pid N") and until when.
    lease_owner: str = ""
    lease_expires_at: datetime | None = None


def list_jobs(
    conn: Connection,
    *,
    state: str | None = None,
    study_instance_uid: str | None = None,
    ids: Sequence[int] | None = None,
    limit: int = 100,
    offset: int = 0,
) -> Page[JobRow]:
    """Jobs, newest first."""
    where: list[ColumnElement[bool]] = []
    if state is not None:
        where.append(Job.state == state)
    if study_instance_uid is not None:
        where.append(Study.study_instance_uid == study_instance_uid)
    if ids is not None:
        where.append(Job.id.in_(list(ids)))
    base = select(Job.id).join(Study, Study.id == Job.study_pk).where(*where)
    total = int(conn.execute(select(func.count()).select_from(base.subquery())).scalar_one())
    rows = (
        orm(conn)
        .execute(
            select(Job, Study.study_instance_uid, Series.series_instance_uid)
            .join(Study, Study.id == Job.study_pk)
            .join(Series, Series.id == Job.series_pk, isouter=True)
            .where(*where)
            .order_by(Job.id.desc())
            .limit(limit)
            .offset(offset)
        )
        .all()
    )
    items = [
        JobRow(
            id=j.id,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            pipeline=j.pipeline,
            kind=j.kind,
            state=j.state,
            attempts=j.attempts,
            trigger_reason=j.trigger_reason,
            instances=j.instances,
            created_at=j.created_at,
            queued_at=j.queued_at,
            started_at=j.started_at,
            finished_at=j.finished_at,
            error=j.error,
            lease_owner=j.lease_owner,
            lease_expires_at=j.lease_expires_at,
        )
        for j, study_uid, series_uid in rows
    ]
    return Page(items, total, limit, offset)


def retry_jobs(conn: Connection, ids: Sequence[int] | None = None) -> list[int]:
    """Failed jobs (all, or those in ``ids``) back to pending; the
    dispatcher publishes them again. Returns the ids re-queued."""
    return jobs.requeue_failed(conn, ids)


def reprocess_study(conn: Connection, study_instance_uid: str, now: datetime | None = None) -> int:
    """Write a new pending job for the whole study (its newest assembly),
    as the assembler would for an update; return the job id. Results of
    the same model versions are replaced when it runs (db.results)."""
    study = conn.execute(
        select(Study.id).where(Study.study_instance_uid == study_instance_uid)
    ).scalar_one_or_none()
    if study is None:
        raise NotFound(f"no study {study_instance_uid}")
    assembly = conn.execute(
        select(Assembly.id).where(Assembly.study_pk == study).order_by(Assembly.id.desc()).limit(1)
    ).scalar_one_or_none()
    if assembly is None:
        raise NotFound(f"study {study_instance_uid} has no received group to process")
    instances = conn.execute(
        select(func.count())
        .select_from(Series)
        .join(Series.instances)
        .where(Series.study_pk == study)
    ).scalar_one()
    return jobs.create_job(
        conn,
        assembly_pk=assembly,
        study_pk=study,
        series_pk=None,
        kind=JobKind.RERUN,
        trigger_reason="admin reprocess",
        instances=int(instances),
        now=now or datetime.now(UTC),
    )


# --- results --------------------------------------------------------------------


@dataclass(frozen=True)
class ResultFilter:
    model: str | None = None
    version: str | None = None
    label: str | None = None  # code meaning or code value
    probability_min: float | None = None
    probability_max: float | None = None
    ood: bool | None = None
    since: datetime | None = None
    until: datetime | None = None
    study_instance_uid: str | None = None


@dataclass(frozen=True)
class FindingRow(Row):
    id: int
    study_instance_uid: str
    series_instance_uid: str
    job_id: int
    model_name: str
    model_version: str
    task: str
    code_scheme: str
    code_value: str
    code_meaning: str
    probability: float
    positive: bool
    ood: bool
    ood_score: float | None
    created_at: datetime


def _result_where(model: Any, flt: ResultFilter) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if flt.model is not None:
        where.append(model.model_name == flt.model)
    if flt.version is not None:
        where.append(model.model_version == flt.version)
    if flt.label is not None:
        where.append((model.code_meaning == flt.label) | (model.code_value == flt.label))
    if flt.ood is not None:
        where.append(model.ood == flt.ood)
    if flt.since is not None:
        where.append(model.created_at >= flt.since)
    if flt.until is not None:
        where.append(model.created_at < flt.until)
    if flt.study_instance_uid is not None:
        where.append(Study.study_instance_uid == flt.study_instance_uid)
    return where


def list_findings(
    conn: Connection, flt: ResultFilter | None = None, *, limit: int = 100, offset: int = 0
) -> Page[FindingRow]:
    """Classification findings, newest first."""
    flt = flt or ResultFilter()
    where = _result_where(Finding, flt)
    if flt.probability_min is not None:
        where.append(Finding.probability >= flt.probability_min)
    if flt.probability_max is not None:
        where.append(Finding.probability <= flt.probability_max)
    joined = (
        select(Finding, Study.study_instance_uid, Series.series_instance_uid)
        .join(Study, Study.id == Finding.study_pk)
        .join(Series, Series.id == Finding.series_pk)
        .where(*where)
    )
    total = int(
        conn.execute(
            select(func.count())
            .select_from(Finding)
            .join(Study, Study.id == Finding.study_pk)
            .where(*where)
        ).scalar_one()
    )
    rows = (
        orm(conn)
        .execute(
            joined.order_by(Finding.created_at.desc(), Finding.id.desc())
            .limit(limit)
            .offset(offset)
        )
        .all()
    )
    items = [
        FindingRow(
            id=f.id,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            job_id=f.job_pk,
            model_name=f.model_name,
            model_version=f.model_version,
            task=f.task,
            code_scheme=f.code_scheme,
            code_value=f.code_value,
            code_meaning=f.code_meaning,
            probability=f.probability,
            positive=f.positive,
            ood=f.ood,
            ood_score=f.ood_score,
            created_at=f.created_at,
        )
        for f, study_uid, series_uid in rows
    ]
    return Page(items, total, limit, offset)


@dataclass(frozen=True)
class SegmentRow(Row):
    id: int
    study_instance_uid: str
    series_instance_uid: str
    job_id: int
    model_name: str
    model_version: str
    segment_number: int
    code_scheme: str
    code_value: str
    code_meaning: str
    voxel_count: int
    volume_mm3: float
    mean_intensity: float | None
    bbox: list[int]  # z0, y0, x0, z1, y1, x1 (half-open voxel indices)
    ood: bool
    mask_path: str
    created_at: datetime


def list_segments(
    conn: Connection, flt: ResultFilter | None = None, *, limit: int = 100, offset: int = 0
) -> Page[SegmentRow]:
    """Segments with their measurements, newest first (probability bounds
    do not apply to segments)."""
    flt = flt or ResultFilter()
    where = _result_where(Segment, flt)
    total = int(
        conn.execute(
            select(func.count())
            .select_from(Segment)
            .join(Study, Study.id == Segment.study_pk)
            .where(*where)
        ).scalar_one()
    )
    rows = (
        orm(conn)
        .execute(
            select(Segment, Study.study_instance_uid, Series.series_instance_uid)
            .join(Study, Study.id == Segment.study_pk)
            .join(Series, Series.id == Segment.series_pk)
            .where(*where)
            .order_by(Segment.created_at.desc(), Segment.id.desc())
            .limit(limit)
            .offset(offset)
        )
        .all()
    )
    items = [
        SegmentRow(
            id=s.id,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            job_id=s.job_pk,
            model_name=s.model_name,
            model_version=s.model_version,
            segment_number=s.segment_number,
            code_scheme=s.code_scheme,
            code_value=s.code_value,
            code_meaning=s.code_meaning,
            voxel_count=s.voxel_count,
            volume_mm3=s.volume_mm3,
            mean_intensity=s.mean_intensity,
            bbox=[s.bbox_z0, s.bbox_y0, s.bbox_x0, s.bbox_z1, s.bbox_y1, s.bbox_x1],
            ood=s.ood,
            mask_path=s.mask_path,
            created_at=s.created_at,
        )
        for s, study_uid, series_uid in rows
    ]
    return Page(items, total, limit, offset)


# --- exports --------------------------------------------------------------------


def page_exports(
    conn: Connection,
    *,
    state: str | None = None,
    destination: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> Page[ExportRow]:
    """:func:`db.exports.list_exports` with the total."""
    where: list[ColumnElement[bool]] = []
    if state is not None:
        where.append(Export.state == state)
    if destination is not None:
        where.append(Export.destination == destination)
    total = int(conn.execute(select(func.count(Export.id)).where(*where)).scalar_one())
    rows = list_exports(conn, state=state, destination=destination, limit=limit, offset=offset)
    return Page(rows, total, limit, offset)
