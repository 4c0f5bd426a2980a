"""Celery tasks: thin wrappers that take job ids and call plain functions.

``run_job`` runs :mod:`workers.pipeline` for one job. Transient errors
(database or broker unavailable, I/O) are retried with backoff and jitter,
a bounded number of times; anything else fails the job with its reason.
"""

from __future__ import annotations

import logging
import random
from functools import cache

from celery import Task
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from db.session import create_db_engine
from pacsnode.errors import PacsnodeError
from pacsnode.settings import Settings, load_settings
from workers import jobstate, pipeline
from workers.celery_app import make_app

log = logging.getLogger(__name__)

app = make_app(load_settings())

MAX_RETRIES = 5


def is_transient(exc: BaseException) -> bool:
    """The one retry decision: worth trying again later?"""
    if isinstance(exc, PacsnodeError):
        return False  # bad geometry, undecodable pixels: retrying cannot help
    if isinstance(exc, OperationalError | ConnectionError | TimeoutError):
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


@app.task(bind=True, name="pacsnode.run_job", max_retries=MAX_RETRIES)
def run_job(self: Task, job_id: int) -> None:
    engine = _engine()
    with engine.begin() as conn:
        jobstate.mark_running(conn, job_id)
    try:
        pipeline.run(job_id, engine, _settings())
    except Exception as exc:
        if is_transient(exc) and self.request.retries < MAX_RETRIES:
            log.warning("job %d: transient %s, retrying", job_id, type(exc).__name__)
            raise self.retry(exc=exc, countdown=retry_delay(self.request.retries)) from exc
        reason = str(exc) if isinstance(exc, PacsnodeError) else type(exc).__name__
        log.error("job %d failed: %s", job_id, reason)
        with engine.begin() as conn:
            jobstate.mark_failed(conn, job_id, reason)
        return
    with engine.begin() as conn:
        jobstate.mark_succeeded(conn, job_id)
