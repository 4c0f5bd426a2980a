"""The query layer the CLI (and later the API and dashboard) share."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from db.models import Instance, Patient, Series, Study


@dataclass(frozen=True)
class StudySummary:
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

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["last_received_at"] = self.last_received_at.isoformat()
        return data


def list_studies(
    engine: Engine,
    *,
    limit: int = 100,
    offset: int = 0,
    patient_id: str | None = None,
    accession_number: str | None = None,
    modality: str | None = None,
) -> list[StudySummary]:
    """Received studies, most recently received first."""
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
    stmt = (
        select(Study, Patient, counts.c.series_count, counts.c.instance_count, counts.c.size_bytes)
        .join(Patient, Study.patient_pk == Patient.id)
        .join(counts, counts.c.study_pk == Study.id, isouter=True)
        .order_by(Study.last_received_at.desc(), Study.id.desc())
        .limit(limit)
        .offset(offset)
    )
    if patient_id is not None:
        stmt = stmt.where(Patient.patient_id == patient_id)
    if accession_number is not None:
        stmt = stmt.where(Study.accession_number == accession_number)
    if modality is not None:
        stmt = stmt.where(Study.id.in_(select(Series.study_pk).where(Series.modality == modality)))
    with Session(engine) as conn:
        rows = conn.execute(stmt).all()
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
    return [
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
        )
        for row in rows
    ]
