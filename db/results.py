"""Persisting model results: findings and segments of one model on one series.

A job may run more than once (redelivery, a late series' update job, an
admin's re-run). Each run replaces the rows of the same model version on the
same series in one transaction, so results are never duplicated and a reader
never sees half of a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, delete, insert, select

from pacsnode.db.models import Finding, FindingSource, Segment


@dataclass(frozen=True)
class ModelIdentity:
    """Which model produced a result: recorded on every row."""

    name: str
    version: str
    weights_sha256: str
    task: str


@dataclass(frozen=True)
class Code:
    """A coded concept (PS3.3 8.8): e.g. SCT 52988006 "Lesion"."""

    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True)
class FindingRecord:
    code: Code
    probability: float
    positive: bool
    ood: bool
    ood_score: float | None


@dataclass(frozen=True)
class SegmentRecord:
    segment_number: int
    code: Code
    voxel_count: int
    volume_mm3: float
    bbox: tuple[int, int, int, int, int, int]  # z0, y0, x0, z1, y1, x1 (half-open)
    mean_intensity: float | None
    ood: bool
    mask_path: str  # relative to <data_dir>/results


def replace_results(
    conn: Connection,
    *,
    job_id: int,
    study_pk: int,
    series_pk: int,
    model: ModelIdentity,
    findings: Sequence[FindingRecord] = (),
    segments: Sequence[SegmentRecord] = (),
    sources: Sequence[tuple[str, int]] = (),
) -> None:
    """Replace this model version's results on this series, in the caller's
    transaction. ``sources`` (role, series pk) are the series a fusion
    model's findings came from; each finding records all of them."""
    now = datetime.now(UTC)
    common = {
        "job_pk": job_id,
        "study_pk": study_pk,
        "series_pk": series_pk,
        "model_name": model.name,
        "model_version": model.version,
        "weights_sha256": model.weights_sha256,
        "created_at": now,
    }
    old = select(Finding.id).where(
        Finding.series_pk == series_pk,
        Finding.model_name == model.name,
        Finding.model_version == model.version,
    )
    conn.execute(delete(FindingSource).where(FindingSource.finding_pk.in_(old)))
    for table in (Finding, Segment):
        conn.execute(
            delete(table).where(
                table.series_pk == series_pk,
                table.model_name == model.name,
                table.model_version == model.version,
            )
        )
    if findings:
        inserted = conn.execute(
            insert(Finding).returning(Finding.id),
            [
                {
                    **common,
                    "task": model.task,
                    "code_scheme": f.code.scheme,
                    "code_value": f.code.value,
                    "code_meaning": f.code.meaning,
                    "probability": float(f.probability),
                    "positive": f.positive,
                    "ood": f.ood,
                    "ood_score": None if f.ood_score is None else float(f.ood_score),
                }
                for f in findings
            ],
        )
        finding_ids = [int(i) for i in inserted.scalars()]
        if sources:
            conn.execute(
                insert(FindingSource),
                [
                    {"finding_pk": fid, "series_pk": spk, "role": role}
                    for fid in finding_ids
                    for role, spk in sources
                ],
            )
    if segments:
        rows = []
        for s in segments:
            z0, y0, x0, z1, y1, x1 = s.bbox
            values = asdict(s)
            del values["bbox"], values["code"]
            rows.append(
                {
                    **common,
                    **values,
                    "code_scheme": s.code.scheme,
                    "code_value": s.code.value,
                    "code_meaning": s.code.meaning,
                    "bbox_z0": z0,
                    "bbox_y0": y0,
                    "bbox_x0": x0,
                    "bbox_z1": z1,
                    "bbox_y1": y1,
                    "bbox_x1": x1,
                }
            )
        conn.execute(insert(Segment), rows)
