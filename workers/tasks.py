"""Celery tasks: thin wrappers that take job ids and call plain functions.

``run_job`` (cpu queue) runs the job's load and preprocess stages of
:mod:`workers.pipeline`, then hands the job to ``infer_job`` (gpu queue) when
a model applies to it; ``infer_job`` runs the rest. Transient errors
(database or broker unavailable, I/O) are retried with backoff and jitter,
a bounded number of times; anything else fails the job with its reason.

``export_due`` (cpu queue) sends the export rows that are due
(:func:`scp.export.run_due`); the dispatcher publishes it while due rows
exist, and :func:`publish_export_due` asks for it at once.
"""

from __future__ import annotations

import logging
import random
from functools import cache

from celery import Task
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from pacsnode.core.errors import PacsnodeError
from pacsnode.core.settings import Settings, load_settings
from pacsnode.db.session import create_db_engine
from pacsnode.scp.export import run_due
from pacsnode.workers import jobstate, pipeline
from pacsnode.workers.celery_app import CPU_QUEUE, GPU_QUEUE, make_app

log = logging.getLogger(__name__)

app = make_app(load_settings())

MAX_RETRIES = 5


def is_transient(exc: BaseException) -> bool:
    """The one retry decision: worth trying again later?"""
    if isinstance(exc, PacsnodeError):
        return False  # bad geometry, undecodable pixels: retrying cannot help
    if isinstance(exc, OperationalError | KombuOperationalError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, DBAPIError):
        return bool(exc.connection_invalidated)
    return False


def retry_delay(retries: int) -> float:
    """Exponential backoff (1, 2, 4 … 60 s) with jitter, so workers that hit
    the same outage do not all come back at the same moment."""
    return float(min(2**retries, 60)) * random.uniform(0.5, 1.0)


@cache
def _engine() -> Engine:
    """One engine per worker process."""
    return create_db_engine(_settings().effective_database_url)


def _settings() -> Settings:
    settings: Settings = app.conf.pacsnode_settings
    return settings


def _run_stages(task: Task, job_id: int, stages: tuple[str, ...]) -> pipeline.JobContext | None:
    """Run ``stages`` of the job; on error retry (transient) or fail the job.
    Returns the context, or None when the job failed."""
    engine = _engine()
    try:
        return pipeline.run(job_id, engine, _settings(), stages)
    except Exception as exc:
        if is_transient(exc) and task.request.retries < MAX_RETRIES:
            log.warning("job %d: transient %s, retrying", job_id, type(exc).__name__)
            raise task.retry(exc=exc, countdown=retry_delay(task.request.retries)) from exc
        reason = str(exc) if isinstance(exc, PacsnodeError) else type(exc).__name__
        log.error("job %d failed: %s", job_id, reason)
        with engine.begin() as conn:
            jobstate.mark_failed(conn, job_id, reason)
        return None


@app.task(bind=True, name="pacsnode.run_job", max_retries=MAX_RETRIES)
def run_job(self: Task, job_id: int) -> None:
    """cpu queue: load and preprocess; then the models' part goes to the gpu
    queue, or the job is done when no model applies."""
    engine = _engine()
    with engine.begin() as conn:
        jobstate.mark_running(conn, job_id)
    ctx = _run_stages(self, job_id, pipeline.CPU_STAGES)
    if ctx is None:
        return
    if pipeline.needs_models(ctx):
        try:
            infer_job.apply_async(args=[job_id], queue=GPU_QUEUE)
        except Exception as exc:  # broker unreachable: try the whole task again
            if self.request.retries < MAX_RETRIES:
                raise self.retry(exc=exc, countdown=retry_delay(self.request.retries)) from exc
            raise
        return
    with engine.begin() as conn:
        jobstate.mark_succeeded(conn, job_id)


@app.task(bind=True, name="pacsnode.infer_job", max_retries=MAX_RETRIES)
def infer_job(self: Task, job_id: int) -> None:
    """gpu queue: every stage; load and preprocess mostly read what the cpu
    task cached (data_dir is shared by the node's workers)."""
    if _run_stages(self, job_id, pipeline.ALL_STAGES) is None:
        return
    with _engine().begin() as conn:
        jobstate.mark_succeeded(conn, job_id)


# export_due's hard limit (db.exports.LEASE_S is this plus a minute: a claim
# older than that lost its worker); run_due stops claiming long before it.
EXPORT_TIME_LIMIT_S = 600
EXPORT_TASK = "pacsnode.export_due"


@app.task(
    bind=True,
    name=EXPORT_TASK,
    max_retries=MAX_RETRIES,
    time_limit=EXPORT_TIME_LIMIT_S,
    soft_time_limit=EXPORT_TIME_LIMIT_S - 60,
)
def export_due(self: Task) -> None:
    """cpu queue: send every due export row. Idempotent: it only sends what
    it claims, so a duplicate or redelivered message finds nothing to do."""
    try:
        summary = run_due(_engine(), _settings())
    except Exception as exc:
        if is_transient(exc) and self.request.retries < MAX_RETRIES:
            log.warning("export_due: transient %s, retrying", type(exc).__name__)
            raise self.retry(exc=exc, countdown=retry_delay(self.request.retries)) from exc
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
