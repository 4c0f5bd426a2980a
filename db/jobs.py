"""The job lifecycle: the one module that creates job rows and writes ``job.state``.

    pending ──dispatcher published it──▶ queued ──a worker started it──▶ running
    running ──▶ succeeded | failed
    queued | running ──node restarted──▶ pending           (requeue_unfinished)
    running for longer than any task may ──▶ pending | failed  (recover_lost)
    failed ──an operator's retry──▶ pending                 (requeue_failed)

Who calls what: the assembler writes a job in the transaction that marks its
group triggered (:func:`create_job` from :func:`pacsnode.db.assembly.trigger`);
an administrator's reprocess writes one too (:mod:`pacsnode.db.admin`); the
dispatcher (:mod:`pacsnode.workers.dispatcher`) moves pending jobs to queued
and takes back lost ones; the Celery tasks (:mod:`pacsnode.workers.tasks`)
mark them running, succeeded or failed. A job may be published and run again
(at-least-once delivery): every transition is a plain UPDATE keyed by the job
id, so repeating one is harmless. Every function takes the caller's
connection, so a transition commits with whatever else the caller writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import Connection, func, insert, select, update

from pacsnode.core.states import JobKind, JobState
from pacsnode.db.models import Job

ERROR_MAX = 1024
DEFAULT_PIPELINE = "default"


def _now() -> datetime:
    return datetime.now(UTC)


def create_job(
    conn: Connection,
    *,
    assembly_pk: int,
    study_pk: int,
    series_pk: int | None,
    kind: JobKind,
    trigger_reason: str,
    instances: int,
    now: datetime,
    pipeline: str = DEFAULT_PIPELINE,
) -> int:
    """Write a pending job (the outbox) in the caller's transaction; the
    dispatcher publishes it. Returns its id."""
    job_id = conn.execute(
        insert(Job)
        .values(
            assembly_pk=assembly_pk,
            study_pk=study_pk,
            series_pk=series_pk,
            pipeline=pipeline,
            kind=kind,
            state=JobState.PENDING,
            attempts=0,
            trigger_reason=trigger_reason,
            instances=instances,
            created_at=now,
            error="",
        )
        .returning(Job.id)
    ).scalar_one()
    return int(job_id)


def pending_jobs(conn: Connection, limit: int = 100) -> list[int]:
    stmt = select(Job.id).where(Job.state == JobState.PENDING).order_by(Job.id).limit(limit)
    return [int(i) for i in conn.execute(stmt).scalars()]


def mark_queued(conn: Connection, job_id: int) -> None:
    conn.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.PENDING)
        .values(state=JobState.QUEUED, queued_at=_now())
    )


def requeue_unfinished(conn: Connection) -> int:
    """At start-up: jobs queued or running when the node stopped go back to
    pending, to be published again (their messages may be gone)."""
    result = conn.execute(
        update(Job)
        .where(Job.state.in_((JobState.QUEUED, JobState.RUNNING)))
        .values(state=JobState.PENDING)
    )
    return int(result.rowcount or 0)


def recover_lost(conn: Connection, started_before: datetime, max_attempts: int) -> tuple[int, int]:
    """Jobs still ``running`` since before ``started_before`` lost their
    worker: no task outlives its hard time limit, and one killed by that limit,
    or with its whole worker, cannot record its own end. Back to pending, or
    failed once they have had ``max_attempts`` runs. Returns (requeued, failed)."""
    stale = (Job.state == JobState.RUNNING, Job.started_at < started_before)
    failed = conn.execute(
        update(Job)
        .where(*stale, Job.attempts >= max_attempts)
        .values(
            state=JobState.FAILED,
            finished_at=_now(),
            error=f"worker lost or time limit exceeded in {max_attempts} attempts",
        )
    )
    requeued = conn.execute(update(Job).where(*stale).values(state=JobState.PENDING))
    return int(requeued.rowcount or 0), int(failed.rowcount or 0)


def mark_running(conn: Connection, job_id: int) -> None:
    conn.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(state=JobState.RUNNING, started_at=_now(), attempts=Job.attempts + 1)
    )


def mark_succeeded(conn: Connection, job_id: int) -> None:
    conn.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(state=JobState.SUCCEEDED, finished_at=_now(), error="")
    )


def mark_failed(conn: Connection, job_id: int, reason: str) -> None:
    conn.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(state=JobState.FAILED, finished_at=_now(), error=reason[:ERROR_MAX])
    )


def counts(conn: Connection) -> dict[str, int]:
    rows = conn.execute(select(Job.state, func.count()).group_by(Job.state))
    return {state: int(n) for state, n in rows}


def requeue_failed(conn: Connection, ids: Sequence[int] | None = None) -> list[int]:
    """An operator's retry: failed jobs (all, or those in ``ids``) back to
    pending, for the dispatcher to publish again. Returns the ids."""
    where = [Job.state == JobState.FAILED]
    if ids is not None:
        where.append(Job.id.in_(list(ids)))
    rows = conn.execute(
        update(Job).where(*where).values(state=JobState.PENDING, error="").returning(Job.id)
    )
    return sorted(int(i) for i in rows.scalars())
