"""The query layer the API, the CLI and the dashboard share: studies and series.

Every function takes the caller's connection (so the API can write its audit
row in the same transaction), filters with bound parameters only, and
returns a :class:`Page`: the rows asked for and how many match in all.
Jobs, results and exports are in :mod:`db.admin`, statistics in
:mod:`db.stats`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Select, func, select
from sqlalchemy.orm import Session

from pacsnode.core.states import StudyStatus
from pacsnode.db.models import Instance, Job, Patient, Series, Study

T = TypeVar("T")

# A study's status: its newest job's state, or "receiving" before any job.
STUDY_STATUSES = tuple(s.value for s in StudyStatus)


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


def orm(conn: Connection) -> Session:
    """A session on the caller's connection (and transaction), for selects of
    mapped classes; it never commits."""
    return Session(bind=conn)


def jsonable(value: Any) -> Any:
    """Datetimes as ISO 8601 in UTC (SQLite hands them back naive)."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


class Row:
    """Mixin: a dataclass row as JSON."""

    def as_json(self) -> dict[str, Any]:
        return jsonable(asdict(self))  # type: ignore[call-overload]


@dataclass(frozen=True)
class StudySummary(Row):
    study_instance_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    accession_number: str
    study_description: str
    modalities: list[str]
    series_count: int
    instance_count: int
    size_bytes: int
    last_received_at: datetime
    status: str = StudyStatus.RECEIVING
    id: int = 0


@dataclass(frozen=True)
class SeriesSummary(Row):
    id: int
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part_examined: str
    instance_count: int
    calling_ae_title: str
    last_received_at: datetime


@dataclass(frozen=True)
class StudyFilter:
    patient_id: str | None = None
    accession_number: str | None = None
    modality: str | None = None
    date_from: str | None = None  # DICOM DA, inclusive
    date_to: str | None = None
    status: str | None = None
    study_instance_uid: str | None = None


def _latest_job() -> Any:
    newest = select(Job.study_pk, func.max(Job.id).label("job_id")).group_by(Job.study_pk)
    sub = newest.subquery()
    return (
        select(sub.c.study_pk, Job.state).join(Job, Job.id == sub.c.job_id).subquery("latest_job")
    )


def _study_where(stmt: Select[Any], flt: StudyFilter, latest: Any) -> Select[Any]:
    if flt.patient_id is not None:
        stmt = stmt.where(Patient.patient_id == flt.patient_id)
    if flt.accession_number is not None:
        stmt = stmt.where(Study.accession_number == flt.accession_number)
    if flt.study_instance_uid is not None:
        stmt = stmt.where(Study.study_instance_uid == flt.study_instance_uid)
    if flt.modality is not None:
        stmt = stmt.where(
            Study.id.in_(select(Series.study_pk).where(Series.modality == flt.modality))
        )
    if flt.date_from is not None:
        stmt = stmt.where(Study.study_date >= flt.date_from, Study.study_date != "")
    if flt.date_to is not None:
        stmt = stmt.where(Study.study_date <= flt.date_to, Study.study_date != "")
    if flt.status == StudyStatus.RECEIVING:
        stmt = stmt.where(latest.c.state.is_(None))
    elif flt.status is not None:
        stmt = stmt.where(latest.c.state == flt.status)
    return stmt


def list_studies(
    conn: Connection, flt: StudyFilter | None = None, *, limit: int = 100, offset: int = 0
) -> Page[StudySummary]:
    """Received studies, most recently received first."""
    flt = flt or StudyFilter()
    latest = _latest_job()
    counts = (
        select(
            Series.study_pk,
            func.count(func.distinct(Series.id)).label("series_count"),
            func.count(Instance.id).label("instance_count"),
            func.coalesce(func.sum(Instance.size_bytes), 0).label("size_bytes"),
        )
        .join(Instance, Instance.series_pk == Series.id, isouter=True)
        .group_by(Series.study_pk)
        .subquery()
    )
    base = (
        select(Study.id)
        .join(Patient, Study.patient_pk == Patient.id)
        .join(latest, latest.c.study_pk == Study.id, isouter=True)
    )
    base = _study_where(base, flt, latest)
    total = int(conn.execute(select(func.count()).select_from(base.subquery())).scalar_one())
    stmt = (
        select(
            Study,
            Patient,
            counts.c.series_count,
            counts.c.instance_count,
            counts.c.size_bytes,
            latest.c.state,
        )
        .join(Patient, Study.patient_pk == Patient.id)
        .join(counts, counts.c.study_pk == Study.id, isouter=True)
        .join(latest, latest.c.study_pk == Study.id, isouter=True)
        .order_by(Study.last_received_at.desc(), Study.id.desc())
        .limit(limit)
        .offset(offset)
    )
    rows = orm(conn).execute(_study_where(stmt, flt, latest)).all()
    pks = [row.Study.id for row in rows]
    modalities: dict[int, list[str]] = {}
    if pks:
        mods = conn.execute(
            select(Series.study_pk, Series.modality)
            .where(Series.study_pk.in_(pks))
            .distinct()
            .order_by(Series.modality)
        )
        for study_pk, modality_value in mods:
            modalities.setdefault(study_pk, []).append(modality_value)
    items = [
        StudySummary(
            study_instance_uid=row.Study.study_instance_uid,
            patient_id=row.Patient.patient_id,
            patient_name=row.Patient.patient_name,
            study_date=row.Study.study_date,
            accession_number=row.Study.accession_number,
            study_description=row.Study.study_description,
            modalities=modalities.get(row.Study.id, []),
            series_count=row.series_count or 0,
            instance_count=row.instance_count or 0,
            size_bytes=int(row.size_bytes or 0),
            last_received_at=row.Study.last_received_at,
            status=row.state or StudyStatus.RECEIVING,
            id=row.Study.id,
        )
        for row in rows
    ]
    return Page(items, total, limit, offset)


def get_study(conn: Connection, study_instance_uid: str) -> StudySummary | None:
    page = list_studies(conn, StudyFilter(study_instance_uid=study_instance_uid), limit=1)
    return page.items[0] if page.items else None


def list_series(
    conn: Connection,
    *,
    study_instance_uid: str | None = None,
    modality: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> Page[SeriesSummary]:
    """Series, newest first, optionally of one study or modality."""
    where = []
    if study_instance_uid is not None:
        where.append(Study.study_instance_uid == study_instance_uid)
    if modality is not None:
        where.append(Series.modality == modality)
    counts = (
        select(Instance.series_pk, func.count(Instance.id).label("n"))
        .group_by(Instance.series_pk)
        .subquery()
    )
    base = select(Series.id).join(Study, Study.id == Series.study_pk).where(*where)
    total = int(conn.execute(select(func.count()).select_from(base.subquery())).scalar_one())
    rows = (
        orm(conn)
        .execute(
            select(Series, Study.study_instance_uid, counts.c.n)
            .join(Study, Study.id == Series.study_pk)
            .join(counts, counts.c.series_pk == Series.id, isouter=True)
            .where(*where)
            .order_by(Series.last_received_at.desc(), Series.id.desc())
            .limit(limit)
            .offset(offset)
        )
        .all()
    )
    items = [
        SeriesSummary(
            id=s.id,
            series_instance_uid=s.series_instance_uid,
            study_instance_uid=study_uid,
            modality=s.modality,
            series_number=s.series_number,
            series_description=s.series_description,
            body_part_examined=s.body_part_examined,
            instance_count=int(n or 0),
            calling_ae_title=s.calling_ae_title,
            last_received_at=s.last_received_at,
        )
        for s, study_uid, n in rows
    ]
    return Page(items, total, limit, offset)
