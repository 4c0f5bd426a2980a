"""The dispatcher: publishes the outbox's pending jobs to the broker.

The database is the source of truth for work (docs/architecture.md §3). A job is
taken to queued with a new fence just before its message (carrying the
fence) is published, and put back to pending if the broker refuses it; while
the broker is down jobs stay pending and are published when it is back. At
start-up, jobs that were queued when the node stopped are published again:
their messages may have been lost with the broker (a surviving one is stale
then, and dropped by the worker). Every second, running jobs whose lease
expired lost their worker (killed outright, its host gone, or stopped by the
time limit) and are published again, a bounded number of times: the embedded
broker forgets a message its consumer took, Redis gives it back only after
its visibility timeout, RabbitMQ at once; the lease treats them alike.

Job transitions go through :mod:`pacsnode.db.jobs`, the one owner of the job
lifecycle.

Exports (docs/architecture.md §3, exports) are rows too (:mod:`db.exports`): while some are due,
the dispatcher publishes one ``export_due`` task, and another only when rows
it has not seen become due (new, back from backoff, re-queued, or claimed by
a lost worker), or when the last message may have been lost. A worker busy
with a long job therefore does not collect a pile of redundant messages.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

from celery import Celery
from sqlalchemy import Engine

from pacsnode.core.taskdefs import EXPORT_DUE, LOST_JOB_AFTER_S, RUN_JOB
from pacsnode.db import exports, jobs
from pacsnode.workers.celery_app import CPU_QUEUE

log = logging.getLogger(__name__)

POLL_S = 0.1
# How often expired leases are looked for (a cheap indexed query).
RECOVERY_EVERY_S = 1.0
# Runs a job gets before a lost worker or time limit fails it.
MAX_ATTEMPTS = 3
EXPORT_POLL_S = 0.5
# Publish export_due again after this long even if no new row became due,
# in case the last message was lost with the broker.
EXPORT_REPUBLISH_S = 300
# Give up a publish quickly when the broker is down; the next pass retries.
PUBLISH_RETRY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


def dispatch_once(engine: Engine, app: Celery) -> int:
    """Publish pending jobs; return how many were published."""
    with engine.connect() as conn:
        ids = jobs.pending_jobs(conn)
    published = 0
    for job_id in ids:
        with engine.begin() as conn:
            fence = jobs.mark_queued(conn, job_id)
        if fence is None:
            continue
        try:
            app.send_task(
                RUN_JOB.name,
                args=[job_id, fence],
                queue=CPU_QUEUE,
                retry=True,
                retry_policy=PUBLISH_RETRY,
            )
        except Exception as exc:
            with engine.begin() as conn:
                jobs.unpublish(conn, job_id, fence)
            log.warning("broker unavailable (%s): %d job(s) wait", type(exc).__name__, len(ids))
            break
        log.info("job %d queued (%s queue)", job_id, CPU_QUEUE)
        published += 1
    return published


class ExportPublisher:
    """Publishes ``export_due`` when due export rows exist that the last
    published message may not cover (see the module docstring)."""

    def __init__(self) -> None:
        self.seen: frozenset[tuple[object, ...]] = frozenset()
        self.published_at = float("-inf")  # time.monotonic()

    def __call__(self, engine: Engine, app: Celery, now: datetime | None = None) -> bool:
        """One check; True if a message was published."""
        with engine.connect() as conn:
            due = exports.due_keys(conn, now=now or datetime.now(UTC))
        stale = time.monotonic() - self.published_at > EXPORT_REPUBLISH_S
        if not due or (due <= self.seen and not stale):
            return False
        try:
            app.send_task(EXPORT_DUE.name, queue=CPU_QUEUE, retry=True, retry_policy=PUBLISH_RETRY)
        except Exception as exc:
            log.warning("broker unavailable (%s): %d export(s) wait", type(exc).__name__, len(due))
            return False
        self.seen, self.published_at = due, time.monotonic()
        return True


def recover_lost_jobs(engine: Engine, now: datetime | None = None) -> tuple[int, int]:
    """Jobs whose worker died (their lease expired: it stopped renewing it)
    go back to pending, or fail after ``MAX_ATTEMPTS`` runs. A running job
    without a lease (from before leases) is lost once it ran longer than a
    job task may (``LOST_JOB_AFTER_S``, :mod:`pacsnode.core.taskdefs`)."""
    now = now or datetime.now(UTC)
    started_before = now - timedelta(seconds=LOST_JOB_AFTER_S)
    with engine.begin() as conn:
        requeued, failed = jobs.reclaim_expired(conn, now, started_before, MAX_ATTEMPTS)
    if requeued or failed:
        log.warning(
            "jobs whose worker was lost (lease expired): %d requeued, %d failed", requeued, failed
        )
    return requeued, failed


def run_dispatcher(engine: Engine, app: Celery, stop: threading.Event) -> None:
    with engine.begin() as conn:
        again = jobs.requeue_unfinished(conn)
    if again:
        log.info("publishing %d unfinished job(s) again after a restart", again)
    next_recovery = next_export_check = 0.0
    publish_exports = ExportPublisher()
    while not stop.is_set():
        try:
            if time.monotonic() >= next_recovery:
                recover_lost_jobs(engine)
                next_recovery = time.monotonic() + RECOVERY_EVERY_S
            dispatch_once(engine, app)
            if time.monotonic() >= next_export_check:
                next_export_check = time.monotonic() + EXPORT_POLL_S
                publish_exports(engine, app)
        except Exception:
            log.exception("dispatcher pass failed")
        stop.wait(POLL_S)
