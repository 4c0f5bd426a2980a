"""Celery tasks: thin wrappers that take job ids and call plain functions.

``run_job`` (cpu queue) runs the job's load and preprocess stages of
:mod:`workers.pipeline`, then hands the job to ``infer_job`` (gpu queue) when
a model applies to it; ``infer_job`` runs the rest. The task layer decides the
hand-offs from what the pipeline returns (whether models apply, whether export
rows were queued); the pipeline never calls a task. Transient errors
(:func:`celery_app.is_transient`: database or broker unavailable, Out of
Resources, I/O) are retried with Celery's backoff and jitter, a bounded number
of times; anything else fails the job with its reason. Job transitions go
through :mod:`pacsnode.db.jobs`. Names and time limits:
:mod:`pacsnode.core.taskdefs`.

``export_due`` (cpu queue) sends the export rows that are due
(:func:`scp.export.run_due`); the dispatcher publishes it while due rows
exist, and :func:`publish_export_due` asks for it at once.
"""

from __future__ import annotations

import logging
import threading
from functools import cache

from celery import Task, signals
from sqlalchemy import Engine

from pacsnode.core.errors import PacsnodeError
from pacsnode.core.settings import Settings, load_settings
from pacsnode.core.taskdefs import EXPORT_DUE, INFER_JOB, RUN_JOB
from pacsnode.db import jobs
from pacsnode.db.session import create_db_engine
from pacsnode.scp.export import run_due
from pacsnode.workers import infer, pipeline
from pacsnode.workers.celery_app import (
    CPU_QUEUE,
    GPU_QUEUE,
    RETRY_OPTIONS,
    make_app,
    may_retry,
    retry_later,
)

log = logging.getLogger(__name__)

app = make_app(load_settings())


def warm_models(**_: object) -> None:
    """Celery ``worker_process_init`` receiver: load and trace the enabled
    models in the background of each pool process, so the first job does not
    pay for it and the process starts at once (a job that arrives meanwhile
    waits for the model it needs, not for all of them). The log line
    "models warm: ..." says when it is done."""
    settings = _settings()
    registry = pipeline._registry(settings.models_dir, tuple(settings.disabled_models))
    if registry.enabled:
        threading.Thread(
            target=infer.warm_up, args=(registry,), name="model-warm-up", daemon=True
        ).start()


signals.worker_process_init.connect(warm_models, weak=False)


@cache
def _engine() -> Engine:
    """One engine per worker process."""
    return create_db_engine(_settings().effective_database_url)


def _settings() -> Settings:
    settings: Settings = app.conf.pacsnode_settings
    return settings


def _run_stages(task: Task, job_id: int, stages: tuple[str, ...]) -> pipeline.JobContext | None:
    """Run ``stages`` of the job; ask a worker to send the exports it queued;
    on error retry (transient) or fail the job. Returns the context, or None
    when the job failed."""
    engine = _engine()
    try:
        ctx = pipeline.run(job_id, engine, _settings(), stages)
        if ctx.exports_queued:
            publish_export_due()
        pipeline.raise_fusion_errors(ctx)
        return ctx
    except Exception as exc:
        if may_retry(task, exc):
            log.warning("job %d: transient %s, retrying", job_id, type(exc).__name__)
            raise retry_later(task, exc) from exc
        reason = str(exc) if isinstance(exc, PacsnodeError) else type(exc).__name__
        log.error("job %d failed: %s", job_id, reason)
        with engine.begin() as conn:
            jobs.mark_failed(conn, job_id, reason)
        return None


@app.task(
    bind=True,
    name=RUN_JOB.name,
    time_limit=RUN_JOB.time_limit_s,
    soft_time_limit=RUN_JOB.soft_time_limit_s,
    **RETRY_OPTIONS,
)
def run_job(self: Task, job_id: int) -> None:
    """cpu queue: load and preprocess; then the models' part goes to the gpu
    queue, or the job is done when no model applies."""
    engine = _engine()
    with engine.begin() as conn:
        jobs.mark_running(conn, job_id)
    ctx = _run_stages(self, job_id, pipeline.CPU_STAGES)
    if ctx is None:
        return
    if pipeline.needs_models(ctx):
        try:
            infer_job.apply_async(args=[job_id], queue=GPU_QUEUE)
        except Exception as exc:  # broker unreachable: try the whole task again
            if self.request.retries < self.max_retries:
                raise retry_later(self, exc) from exc
            raise
        return
    with engine.begin() as conn:
        jobs.mark_succeeded(conn, job_id)


@app.task(
    bind=True,
    name=INFER_JOB.name,
    time_limit=INFER_JOB.time_limit_s,
    soft_time_limit=INFER_JOB.soft_time_limit_s,
    **RETRY_OPTIONS,
)
def infer_job(self: Task, job_id: int) -> None:
    """gpu queue: every stage; load and preprocess mostly read what the cpu
    task cached (data_dir is shared by the node's workers)."""
    log.info("job %d: models' task started (gpu queue)", job_id)
    if _run_stages(self, job_id, pipeline.ALL_STAGES) is None:
        return
    with _engine().begin() as conn:
        jobs.mark_succeeded(conn, job_id)


@app.task(
    bind=True,
    name=EXPORT_DUE.name,
    time_limit=EXPORT_DUE.time_limit_s,
    soft_time_limit=EXPORT_DUE.soft_time_limit_s,
    **RETRY_OPTIONS,
)
def export_due(self: Task) -> None:
    """cpu queue: send every due export row. Idempotent: it only sends what
    it claims, so a duplicate or redelivered message finds nothing to do.
    Its claims outlive it by a minute (``EXPORT_LEASE_S``), so a worker that
    dies mid-send loses nothing."""
    try:
        summary = run_due(_engine(), _settings())
    except Exception as exc:
        if may_retry(self, exc):
            log.warning("export_due: transient %s, retrying", type(exc).__name__)
            raise retry_later(self, exc) from exc
        # Claimed rows go back to due when their lease ends; nothing is lost.
        log.exception("export_due failed")
        return
    if summary.batches:
        log.info(
            "export_due: %d sent, %d failed in %d batch(es)",
            summary.sent,
            summary.failed,
            summary.batches,
        )
    if summary.more:
        publish_export_due()


def publish_export_due() -> bool:
    """Ask a worker to send due exports now (best effort: call it after the
    transaction that enqueued them committed). False if the broker is
    unavailable; the dispatcher's poll publishes it then."""
    try:
        export_due.apply_async(
            queue=CPU_QUEUE,
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2},
        )
    except Exception as exc:
        log.warning("export_due not published (%s): the dispatcher will", type(exc).__name__)
        return False
    return True
