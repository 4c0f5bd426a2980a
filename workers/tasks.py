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

Each job message carries the job's fence: the task first claims the job with
it (a stale or duplicate message finds nothing to claim and is dropped), then
runs the stages under the lease's heartbeat (:mod:`pacsnode.workers.lease`); a
worker whose lease was taken back stops and writes nothing more
(:class:`~pacsnode.core.errors.LeaseLost`). The hand-off to ``infer_job``
publishes the job again with the next fence.

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

from pacsnode.core.errors import LeaseLost, PacsnodeError
from pacsnode.core.settings import Settings, load_settings
from pacsnode.core.taskdefs import EXPORT_DUE, INFER_JOB, RUN_JOB
from pacsnode.db import jobs
from pacsnode.db.session import create_db_engine
from pacsnode.scp.export import run_due
from pacsnode.workers import infer, lease, pipeline
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


def _claim(task: Task, job_id: int, fence: int | None, first: bool) -> jobs.Lease | None:
    """Claim the job with the message's fence; None (the message is dropped)
    when it is stale or a duplicate: another attempt has the job, or it is
    done. A database that cannot be reached is retried."""
    if fence is None:  # a message from before leases: the dispatcher republishes the job
        log.info("job %d: message without a fence dropped", job_id)
        return None
    timeout = _settings().job_heartbeat_timeout_s
    try:
        with _engine().begin() as conn:
            found = jobs.claim(
                conn, job_id, fence, lease.owner(), lease.expiry(timeout), first=first
            )
    except Exception as exc:
        if may_retry(task, exc):
            raise retry_later(task, exc) from exc
        raise
    if found is None:
        log.info("job %d: stale or duplicate message (fence %d) dropped", job_id, fence)
    return found


def _run_stages(
    task: Task, held: jobs.Lease, stages: tuple[str, ...]
) -> pipeline.JobContext | None:
    """Run ``stages`` of the job under its lease's heartbeat; ask a worker to
    send the exports it queued; on error retry (transient) or fail the job.
    Returns the context, or None when the job failed or the lease was lost."""
    engine, job_id = _engine(), held.job_id
    try:
        with lease.Heartbeat(engine, held, _settings().job_heartbeat_timeout_s) as beat:
            ctx = pipeline.run(job_id, engine, _settings(), stages, guard=beat.guard)
        if ctx.exports_queued:
            publish_export_due()
        pipeline.raise_fusion_errors(ctx)
        return ctx
    except LeaseLost:
        log.warning("job %d: lease lost to another attempt; this run's work is dropped", job_id)
        return None
    except Exception as exc:
        if may_retry(task, exc):
            log.warning("job %d: transient %s, retrying", job_id, type(exc).__name__)
            _release(held)
            raise retry_later(task, exc) from exc
        reason = str(exc) if isinstance(exc, PacsnodeError) else type(exc).__name__
        log.error("job %d failed: %s", job_id, reason)
        with engine.begin() as conn:
            jobs.mark_failed(conn, held, reason)
        return None


def _release(held: jobs.Lease) -> None:
    """Before Celery runs the task again: the job claimable by the retried
    message. If the database is away, the lease expires and the dispatcher
    publishes the job again instead."""
    try:
        with _engine().begin() as conn:
            jobs.release(conn, held)
    except Exception as exc:
        log.warning("job %d: lease not released (%s)", held.job_id, type(exc).__name__)


def _succeeded(held: jobs.Lease) -> None:
    with _engine().begin() as conn:
        if not jobs.mark_succeeded(conn, held):
            log.warning("job %d: lease lost at the end; the other attempt records it", held.job_id)


@app.task(
    bind=True,
    name=RUN_JOB.name,
    time_limit=RUN_JOB.time_limit_s,
    soft_time_limit=RUN_JOB.soft_time_limit_s,
    **RETRY_OPTIONS,
)
def run_job(self: Task, job_id: int, fence: int | None = None) -> None:
    """cpu queue: load and preprocess; then the models' part goes to the gpu
    queue, or the job is done when no model applies."""
    held = _claim(self, job_id, fence, first=True)
    if held is None:
        return
    ctx = _run_stages(self, held, pipeline.CPU_STAGES)
    if ctx is None:
        return
    if not pipeline.needs_models(ctx):
        _succeeded(held)
        return
    with _engine().begin() as conn:
        next_fence = jobs.hand_off(conn, held, lease.expiry(_settings().job_heartbeat_timeout_s))
    if next_fence is None:
        log.warning("job %d: lease lost before the models' part; dropped", job_id)
        return
    try:
        infer_job.apply_async(args=[job_id, next_fence], queue=GPU_QUEUE)
    except Exception as exc:  # broker unreachable: the dispatcher publishes the job again
        log.warning("job %d: models' part not published (%s)", job_id, type(exc).__name__)
        with _engine().begin() as conn:
            jobs.unpublish(conn, job_id, next_fence)
        return
    with _engine().begin() as conn:
        jobs.published(conn, job_id, next_fence)


@app.task(
    bind=True,
    name=INFER_JOB.name,
    time_limit=INFER_JOB.time_limit_s,
    soft_time_limit=INFER_JOB.soft_time_limit_s,
    **RETRY_OPTIONS,
)
def infer_job(self: Task, job_id: int, fence: int | None = None) -> None:
    """gpu queue: every stage; load and preprocess mostly read what the cpu
    task cached (data_dir is shared by the node's workers)."""
    held = _claim(self, job_id, fence, first=False)
    if held is None:
        return
    log.info("job %d: models' task started (gpu queue)", job_id)
    if _run_stages(self, held, pipeline.ALL_STAGES) is None:
        return
    _succeeded(held)


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
