"""The dispatcher: publishes the outbox's pending jobs to the broker.

The database is the source of truth for work (DESIGN §2). A job is marked
queued only after the broker accepted its message; while the broker is down
jobs stay pending and are published when it is back. At start-up, jobs that
were queued or running when the node stopped are published again: their
messages may have been lost with the broker or the worker, and tasks are
idempotent. While running, jobs that have been ``running`` for longer than a
task's hard time limit lost their worker (killed wholesale, or by the limit)
and are published again, a bounded number of times.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

from celery import Celery
from sqlalchemy import Engine

from workers import jobstate
from workers.celery_app import CPU_QUEUE, TASK_TIME_LIMIT_S

log = logging.getLogger(__name__)

POLL_S = 0.1
# A job running this much longer than a task may has lost its worker.
LOST_GRACE_S = 60
RECOVERY_EVERY_S = 30
# Runs a job gets before a lost worker or time limit fails it.
MAX_ATTEMPTS = 3
TASK = "pacsnode.run_job"
# Give up a publish quickly when the broker is down; the next pass retries.
PUBLISH_RETRY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


def dispatch_once(engine: Engine, app: Celery) -> int:
    """Publish pending jobs; return how many were published."""
    with engine.connect() as conn:
        ids = jobstate.pending_jobs(conn)
    published = 0
    for job_id in ids:
        try:
            app.send_task(
                TASK, args=[job_id], queue=CPU_QUEUE, retry=True, retry_policy=PUBLISH_RETRY
            )
        except Exception as exc:
            log.warning("broker unavailable (%s): %d job(s) wait", type(exc).__name__, len(ids))
            break
        with engine.begin() as conn:
            jobstate.mark_queued(conn, job_id)
        published += 1
    return published


def recover_lost_jobs(engine: Engine, now: datetime | None = None) -> tuple[int, int]:
    """Jobs whose worker died wholesale (its unacknowledged message may be
    gone with it) go back to pending, or fail after ``MAX_ATTEMPTS`` runs."""
    now = now or datetime.now(UTC)
    started_before = now - timedelta(seconds=TASK_TIME_LIMIT_S + LOST_GRACE_S)
    with engine.begin() as conn:
        requeued, failed = jobstate.recover_lost(conn, started_before, MAX_ATTEMPTS)
    if requeued or failed:
        log.warning("jobs whose worker was lost: %d requeued, %d failed", requeued, failed)
    return requeued, failed


def run_dispatcher(engine: Engine, app: Celery, stop: threading.Event) -> None:
    with engine.begin() as conn:
        again = jobstate.requeue_unfinished(conn)
    if again:
        log.info("publishing %d unfinished job(s) again after a restart", again)
    next_recovery = 0.0
    while not stop.is_set():
        try:
            if time.monotonic() >= next_recovery:
                recover_lost_jobs(engine)
                next_recovery = time.monotonic() + RECOVERY_EVERY_S
            dispatch_once(engine, app)
        except Exception:
            log.exception("dispatcher pass failed")
        stop.wait(POLL_S)
