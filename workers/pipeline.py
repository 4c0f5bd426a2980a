"""The pipeline of one job, read top to bottom.

    load → preprocess → infer → fuse → persist → encode → export

Each stage is a plain function of the job context, run in order by
:func:`run`. This release has load and preprocess; model inference, fusion,
persistence of results, DICOM-SEG/SR encoding and export join ``STAGES`` as
they land.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, select

from db.models import Instance, Job, Series, Study
from pacsnode.settings import Settings
from workers.preprocess import PreprocessCache, PreprocessSpec
from workers.volume import load_series

log = logging.getLogger(__name__)

# SOP classes whose instances form a volume (PS3.4 B.5).
VOLUME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image",
}

# Until models bring their own specs: the volume in its own geometry,
# robustly scaled to [0, 1]. Cached, so the models of a job reuse it.
DEFAULT_SPEC = PreprocessSpec(normalise="percentile")


@dataclass
class SeriesInput:
    series_instance_uid: str
    modality: str
    paths: list[Path]
    sop_instance_uids: list[str]


@dataclass
class JobContext:
    job_id: int
    study_instance_uid: str
    settings: Settings
    series: list[SeriesInput] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    volumes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def load(ctx: JobContext, engine: Engine) -> None:
    """The job's series and their spooled files, from the index."""
    with engine.connect() as conn:
        job = conn.execute(select(Job).where(Job.id == ctx.job_id)).one()
        stmt = (
            select(
                Series.series_instance_uid,
                Series.modality,
                Instance.sop_class_uid,
                Instance.sop_instance_uid,
                Instance.path,
            )
            .join(Instance, Instance.series_pk == Series.id)
            .where(Series.study_pk == job.study_pk)
            .order_by(Series.series_instance_uid, Instance.sop_instance_uid)
        )
        if job.series_pk is not None:
            stmt = stmt.where(Series.id == job.series_pk)
        rows = conn.execute(stmt).all()
        study_uid = conn.execute(
            select(Study.study_instance_uid).where(Study.id == job.study_pk)
        ).scalar_one()
    ctx.study_instance_uid = study_uid
    by_series: dict[str, SeriesInput] = {}
    for series_uid, modality, sop_class, sop_uid, path in rows:
        if sop_class not in VOLUME_SOP_CLASSES:
            if series_uid not in ctx.skipped:
                ctx.skipped.append(series_uid)
            continue
        entry = by_series.setdefault(series_uid, SeriesInput(series_uid, modality, [], []))
        entry.paths.append(ctx.settings.spool_dir / path)
        entry.sop_instance_uids.append(sop_uid)
    ctx.series = list(by_series.values())


def preprocess(ctx: JobContext, engine: Engine) -> None:
    """Each volume series, loaded with its geometry checked, then preprocessed
    (cached under ``<data_dir>/cache/preprocessed``)."""
    cache = PreprocessCache(ctx.settings.data_dir / "cache" / "preprocessed")
    for series in ctx.series:
        array = cache.get_or_compute(
            lambda s=series: load_series(s.paths),  # type: ignore[misc]
            series.series_instance_uid,
            series.sop_instance_uids,
            DEFAULT_SPEC,
        )
        ctx.volumes[series.series_instance_uid] = tuple(array.shape)


Stage = Callable[[JobContext, Engine], None]
STAGES: list[tuple[str, Stage]] = [
    ("load", load),
    ("preprocess", preprocess),
]


def run(job_id: int, engine: Engine, settings: Settings) -> JobContext:
    """Run every stage of job ``job_id``; exceptions propagate to the task."""
    ctx = JobContext(job_id=job_id, study_instance_uid="", settings=settings)
    for name, stage in STAGES:
        started = time.perf_counter()
        stage(ctx, engine)
        ctx.timings[name] = time.perf_counter() - started
    log.info(
        "job %d study %s: %d volume series, %d other series skipped, stages %s",
        job_id,
        ctx.study_instance_uid,
        len(ctx.series),
        len(ctx.skipped),
        " ".join(f"{k}={v:.2f}s" for k, v in ctx.timings.items()),
    )
    return ctx
