"""The pipeline of one job, read top to bottom.

    load → preprocess → infer → fuse → persist → encode → export

Each stage is a plain function of the job context, run in order by
:func:`run`. ``infer`` runs the models of each series, ``fuse`` the
study-level fusion models over the study's series (workers.fusion).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from sqlalchemy import Connection, Engine, select

from pacsnode.core.errors import FusionError, PacsnodeError
from pacsnode.core.layout import atomic_write
from pacsnode.core.settings import Destination, Settings
from pacsnode.core.states import FusionState
from pacsnode.db.exports import destinations_for, enqueue_exports
from pacsnode.db.fusion import Outcome, record, study_first_received
from pacsnode.db.models import Instance, Job, Series, Study
from pacsnode.db.modelswitch import effective_disabled, switches
from pacsnode.db.results import replace_results
from pacsnode.db.stats import record_timings
from pacsnode.models.inputspec import PreprocessSpec
from pacsnode.models.manifest import SeriesInfo
from pacsnode.models.registry import RegisteredModel, Registry
from pacsnode.workers.encode import encode_job, read_source
from pacsnode.workers.fusion import (
    Candidate,
    choose_series,
    missing_outcome,
    run_fusion,
)
from pacsnode.workers.infer import ModelResult, infer_series, load_for_inference
from pacsnode.workers.outputs import OutputObject, store_outputs
from pacsnode.workers.preprocess import PreprocessCache
from pacsnode.workers.volume import Volume, load_series

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


@dataclass
class SeriesInput:
    series_instance_uid: str
    modality: str
    body_part_examined: str
    series_description: str
    series_pk: int
    paths: list[Path]
    sop_instance_uids: list[str]


@dataclass
class JobContext:
    job_id: int
    study_instance_uid: str
    settings: Settings
    study_pk: int = 0
    series: list[SeriesInput] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    volumes: dict[str, Volume] = field(default_factory=dict)
    models: dict[str, list[RegisteredModel]] = field(default_factory=dict)
    inputs: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    results: list[ModelResult] = field(default_factory=list)
    outputs: list[OutputObject] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # disabled_models after the administrators' switches (db.modelswitch)
    disabled: tuple[str, ...] = ()
    # Every volume series of the study (fusion models look beyond the job's
    # own series when the sender's policy groups by series).
    study_series: dict[str, SeriesInput] = field(default_factory=dict)
    fusion_errors: list[str] = field(default_factory=list)
    # Export rows the export stage queued: the task layer asks a worker to
    # send them now (the dispatcher's poll would, a moment later).
    exports_queued: int = 0
    # Called before each stage and in the transaction writing the results:
    # renews the worker's lease on the job or raises LeaseLost (workers.lease).
    guard: Callable[[Connection], None] = lambda conn: None


@cache
def _registry(models_dir: Path, disabled: tuple[str, ...]) -> Registry:
    """Manifests are read once per worker process (serve checked them at start)."""
    return Registry.load(models_dir, disabled)


def registry(ctx: JobContext) -> Registry:
    """The models as switched for this job (read when it started)."""
    return _registry(ctx.settings.models_dir, ctx.disabled)


def switched_off(engine: Engine, settings: Settings) -> tuple[str, ...]:
    """The setting's disabled models after the administrators' switches."""
    with engine.connect() as conn:
        found = switches(conn)
    return effective_disabled(settings.disabled_models, found)


def _series_inputs(
    conn: Connection, study_pk: int, series_pk: int | None, spool_dir: Path
) -> tuple[list[SeriesInput], list[str]]:
    """The volume series of a study (or one of its series) with their
    spooled files, and the UIDs of the other series (skipped)."""
    stmt = (
        select(
            Series.id,
            Series.series_instance_uid,
            Series.modality,
            Series.body_part_examined,
            Series.series_description,
            Instance.sop_class_uid,
            Instance.sop_instance_uid,
            Instance.path,
        )
        .join(Instance, Instance.series_pk == Series.id)
        .where(Series.study_pk == study_pk)
        .order_by(Series.series_instance_uid, Instance.sop_instance_uid)
    )
    if series_pk is not None:
        stmt = stmt.where(Series.id == series_pk)
    by_series: dict[str, SeriesInput] = {}
    skipped: list[str] = []
    for pk, series_uid, modality, body_part, description, sop_class, sop_uid, path in conn.execute(
        stmt
    ):
        if sop_class not in VOLUME_SOP_CLASSES:
            if series_uid not in skipped:
                skipped.append(series_uid)
            continue
        entry = by_series.setdefault(
            series_uid,
            SeriesInput(series_uid, modality, body_part or "", description or "", pk, [], []),
        )
        entry.paths.append(spool_dir / path)
        entry.sop_instance_uids.append(sop_uid)
    return list(by_series.values()), skipped


def load(ctx: JobContext, engine: Engine) -> None:
    """The job's series and their spooled files, from the index."""
    with engine.connect() as conn:
        job = conn.execute(select(Job).where(Job.id == ctx.job_id)).one()
        ctx.series, ctx.skipped = _series_inputs(
            conn, job.study_pk, job.series_pk, ctx.settings.spool_dir
        )
        study_uid = conn.execute(
            select(Study.study_instance_uid).where(Study.id == job.study_pk)
        ).scalar_one()
    ctx.study_instance_uid = study_uid
    ctx.study_pk = job.study_pk


def _series_info(series: SeriesInput, volume: Volume) -> SeriesInfo:
    header = pydicom.dcmread(series.paths[0], stop_before_pixels=True, specific_tags=["ImageType"])
    image_type = header.get("ImageType") or ()
    spacing_z, spacing_y, spacing_x = volume.spacing
    return SeriesInfo(
        modality=series.modality,
        body_part_examined=series.body_part_examined,
        series_description=series.series_description,
        image_type=tuple(str(v) for v in image_type),
        slices=int(volume.array.shape[0]),
        pixel_spacing=(spacing_y, spacing_x),
        spacing_between_slices=spacing_z,
    )


def preprocess(ctx: JobContext, engine: Engine) -> None:
    """Each volume series loaded with its geometry checked (a bad one fails
    the job with the reason), the models that apply to it chosen, and their
    inputs preprocessed (cached under ``<data_dir>/cache/preprocessed``, so
    models sharing a spec, and re-runs, share the work)."""
    cache = PreprocessCache(ctx.settings.layout.preprocessed)
    models = registry(ctx)
    for series in ctx.series:
        volume = load_series(series.paths)
        ctx.volumes[series.series_instance_uid] = volume
        selected = models.select(_series_info(series, volume))
        ctx.models[series.series_instance_uid] = selected
        gates = [g for m in selected if (g := models.gate_for(m)) is not None]
        for model in [*selected, *gates]:
            spec = model.manifest.input.preprocess
            key = (series.series_instance_uid, spec.cache_key())
            if key not in ctx.inputs:
                ctx.inputs[key] = cache.get_or_compute(
                    lambda v=volume: v,  # type: ignore[misc]  # already loaded
                    series.series_instance_uid,
                    series.sop_instance_uids,
                    spec,
                )


def infer(ctx: JobContext, engine: Engine) -> None:
    """The selected models on each series (workers.infer)."""
    models = registry(ctx)
    for series in ctx.series:
        uid = series.series_instance_uid

        def input_for(spec: PreprocessSpec, uid: str = uid) -> np.ndarray:
            return ctx.inputs[(uid, spec.cache_key())]

        ctx.results += infer_series(models, ctx.models[uid], ctx.volumes[uid], input_for)
    if ctx.results:
        ctx.timings["forward"] = sum(r.forward_s for r in ctx.results)


def fusion_models(ctx: JobContext) -> list[RegisteredModel]:
    """Enabled study-level models (``task: fusion`` with ``fusion.inputs``)."""
    return [
        m
        for m in registry(ctx).enabled
        if m.manifest.task == "fusion"
        and m.manifest.fusion is not None
        and m.manifest.fusion.inputs
    ]


def _fusion_modalities(models: list[RegisteredModel]) -> set[str]:
    return {
        modality
        for m in models
        if m.manifest.fusion is not None
        for rules in m.manifest.fusion.inputs.values()
        for modality in rules.modality
    }


def _volume(ctx: JobContext, series: SeriesInput) -> Volume:
    uid = series.series_instance_uid
    if uid not in ctx.volumes:
        ctx.volumes[uid] = load_series(series.paths)
    return ctx.volumes[uid]


def fuse(ctx: JobContext, engine: Engine) -> None:
    """Study-level fusion models on the study's series (workers.fusion):
    a result when every role has its series, else a bounded wait recorded
    in ``fusion_outcome`` (db.fusion)."""
    models = fusion_models(ctx)
    if not models:
        return
    modalities = _fusion_modalities(models)
    with engine.connect() as conn:
        inputs, _ = _series_inputs(conn, ctx.study_pk, None, ctx.settings.spool_dir)
        first_received = study_first_received(conn, ctx.study_pk)
    ctx.study_series = {s.series_instance_uid: s for s in inputs}
    candidates = [
        Candidate(s.series_instance_uid, s.series_pk, _series_info(s, _volume(ctx, s)))
        for s in inputs
        if s.modality.strip().upper() in modalities
    ]
    now = datetime.now(UTC)
    for model in models:
        m = model.manifest
        chosen, missing = choose_series(m, candidates)
        if not chosen:
            continue  # none of its roles in this study: the model does not apply
        if missing:
            outcome = missing_outcome(
                missing, chosen, first_received, ctx.settings.fusion.max_wait_s, now
            )
            log.info(
                "job %d study %s: fusion %s %s (%s)",
                ctx.job_id, ctx.study_instance_uid, model.key, outcome.state, outcome.detail,
            )  # fmt: skip
        else:
            try:
                result, scores = run_fusion(
                    model, chosen, lambda uid: ctx.volumes[uid], load_for_inference
                )
            except PacsnodeError as exc:
                ctx.fusion_errors.append(f"fusion {model.key}: {exc}")
                outcome = Outcome(FusionState.FAILED, (), _uids(chosen), str(exc))
                log.error("job %d: fusion %s failed: %s", ctx.job_id, model.key, exc)
            else:
                ctx.results.append(result)
                detail = (
                    f"ct {scores.ct:.4f} pt {scores.pt:.4f} feature {scores.feature:.4f} "
                    f"decision {scores.decision:.4f}"
                )
                outcome = Outcome(FusionState.FUSED, (), _uids(chosen), detail)
                log.info("job %d: fusion %s fused: %s", ctx.job_id, model.key, detail)
        with engine.begin() as conn:
            record(
                conn, study_pk=ctx.study_pk, job_id=ctx.job_id, model_name=m.name,
                model_version=m.version, outcome=outcome, now=now,
            )  # fmt: skip


def _uids(chosen: Mapping[str, Candidate]) -> dict[str, str]:
    return {role: c.series_instance_uid for role, c in chosen.items()}


def _write_mask(path: Path, masks: dict[int, np.ndarray]) -> None:
    """Masks as one compressed .npz (key ``segment_<n>``), written atomically."""
    arrays: dict[str, Any] = {f"segment_{n}": m for n, m in masks.items()}
    atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))


def persist(ctx: JobContext, engine: Engine) -> None:
    """Masks to ``<data_dir>/results``, then every model's rows in one
    transaction, replacing an earlier run's (db.results)."""
    series_pk = {s.series_instance_uid: s.series_pk for s in ctx.series}
    series_pk.update({uid: s.series_pk for uid, s in ctx.study_series.items()})
    for result in ctx.results:
        if result.masks:
            relative = (
                f"{ctx.study_instance_uid}/{result.series_instance_uid}/"
                f"{result.model.name}-{result.model.version}.npz"
            )
            _write_mask(ctx.settings.layout.results / relative, result.masks)
            result.segments = [replace(s, mask_path=relative) for s in result.segments]
    with engine.begin() as conn:
        ctx.guard(conn)
        for result in ctx.results:
            replace_results(
                conn,
                job_id=ctx.job_id,
                study_pk=ctx.study_pk,
                series_pk=series_pk[result.series_instance_uid],
                model=result.model,
                findings=result.findings,
                segments=result.segments,
                sources=[(role, series_pk[uid]) for role, uid in result.sources],
            )


def encode(ctx: JobContext, engine: Engine) -> None:
    """A DICOM-SEG per segmentation result and one TID 1500 SR per job
    (workers.encode), written into the spool and indexed as instances of the
    study (workers.outputs); ``ctx.outputs`` lists them for export."""
    used = {r.series_instance_uid for r in ctx.results}
    used |= {uid for r in ctx.results for _, uid in r.sources}
    every = {s.series_instance_uid: s for s in ctx.series} | ctx.study_series
    sources = {
        uid: read_source(s.paths, ctx.volumes[uid]) for uid, s in every.items() if uid in used
    }
    manifests = {(m.manifest.name, m.manifest.version): m.manifest for m in registry(ctx).models}
    objects = encode_job(
        ctx.study_instance_uid,
        ctx.job_id,
        ctx.results,
        manifests,
        sources,
        ctx.settings.seg,
        ctx.settings.ae_title,
    )
    ctx.outputs = store_outputs(objects, engine, ctx.settings)


def export(ctx: JobContext, engine: Engine) -> None:
    """Each output object queued for its destinations (db.exports: rules per
    model and calling AE, ``@sender``), one transaction for the job; then a
    worker is asked to send them now (by the task layer, from
    ``ctx.exports_queued``). Sending happens in the ``export_due`` task, so a
    destination that is down delays delivery and never the job."""
    if not ctx.outputs:
        return
    with engine.connect() as conn:
        senders = dict(
            conn.execute(
                select(Series.series_instance_uid, Series.calling_ae_title).where(
                    Series.study_pk == ctx.study_pk
                )
            ).all()
        )
    study_sender = next((senders[s.series_instance_uid] for s in ctx.series), "")
    now = datetime.now(UTC)
    deadline = now + timedelta(seconds=ctx.settings.exports.deadline_s)
    queued = 0
    with engine.begin() as conn:
        for output in ctx.outputs:
            sender = senders.get(output.source_series_instance_uid, study_sender)
            chosen: dict[str, Destination] = {}
            for name in output.model_names or (output.model_name,):
                for dest in destinations_for(ctx.settings, name, sender):
                    chosen.setdefault(dest.name, dest)
            queued += len(
                enqueue_exports(
                    conn,
                    job_id=ctx.job_id,
                    instance_pks=[output.instance_pk],
                    destinations=list(chosen.values()),
                    now=now,
                    deadline=deadline,
                )
            )
    ctx.exports_queued = queued


Stage = Callable[[JobContext, Engine], None]
STAGES: list[tuple[str, Stage]] = [
    ("load", load),
    ("preprocess", preprocess),
    ("infer", infer),
    ("fuse", fuse),
    ("persist", persist),
    ("encode", encode),
    ("export", export),
]
ALL_STAGES = tuple(name for name, _ in STAGES)
# The cpu queue's part (workers.tasks.run_job). The gpu queue's task runs all
# stages: its load and preprocess read the preprocess cache the cpu part wrote.
CPU_STAGES = ("load", "preprocess")


def needs_models(ctx: JobContext) -> bool:
    """Whether any model applies to the job's series, or a fusion model may
    use one of them (else the job is done)."""
    if any(ctx.models.values()):
        return True
    modalities = _fusion_modalities(fusion_models(ctx))
    return any(s.modality.strip().upper() in modalities for s in ctx.series)


def run(
    job_id: int,
    engine: Engine,
    settings: Settings,
    stages: tuple[str, ...] = ALL_STAGES,
    guard: Callable[[Connection], None] | None = None,
) -> JobContext:
    """Run ``stages`` of job ``job_id`` in pipeline order and return the
    context, from which the task layer decides what comes next
    (:func:`needs_models`, ``exports_queued``, :func:`raise_fusion_errors`).
    ``guard`` checks the worker still holds the job (before each stage and
    where results are written). Exceptions propagate to the task."""
    ctx = JobContext(job_id=job_id, study_instance_uid="", settings=settings)
    if guard is not None:
        ctx.guard = guard
    ctx.disabled = switched_off(engine, settings)
    for name, stage in STAGES:
        if name not in stages:
            continue
        with engine.begin() as conn:
            ctx.guard(conn)
        started = time.perf_counter()
        stage(ctx, engine)
        ctx.timings[name] = time.perf_counter() - started
        log.info(
            "job %d study %s: %s %.2fs", job_id, ctx.study_instance_uid, name, ctx.timings[name]
        )
    # For the stats endpoint and /metrics (db.stats); the forward passes per model too.
    with engine.begin() as conn:
        ctx.guard(conn)
        record_timings(
            conn, job_id, ctx.timings, [(r.model.name, r.forward_s) for r in ctx.results]
        )
    log.info(
        "job %d study %s: %d volume series, %d other series skipped, %d model result(s), stages %s",
        job_id,
        ctx.study_instance_uid,
        len(ctx.series),
        len(ctx.skipped),
        len(ctx.results),
        " ".join(f"{k}={v:.2f}s" for k, v in ctx.timings.items()),
    )
    return ctx


def raise_fusion_errors(ctx: JobContext) -> None:
    """Fail the job with the fusion models' errors, if any: raised after
    :func:`run` wrote the other models' results and queued their exports, so
    those are kept and sent.

    Raises:
        FusionError: one or more fusion models could not combine the study.
    """
    if ctx.fusion_errors:
        raise FusionError("; ".join(ctx.fusion_errors))
