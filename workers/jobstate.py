"""Job state transitions: the one place that writes ``job.state``.

pending (written by the assembler) → queued (dispatcher published it) →
running (a worker started it) → succeeded | failed; a job running for longer
than any task may is taken back to pending (:func:`recover_lost`). A job may be published
and run again (at-least-once delivery); every transition is a plain UPDATE
keyed by the job id, so repeating one is harmless.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import Connection, func, select, update

from pacsnode.db.models import Job

_ERROR_MAX = 1024


def _now() -> datetime:
    return datetime.now(UTC)


def pending_jobs(conn: Connection, limit: int = 100) -> list[int]:
    stmt = select(Job.id).where(Job.state == "pending").order_by(Job.id).limit(limit)
    return [int(i) for i in conn.execute(stmt).scalars()]


def mark_queued(conn: Connection, job_id: int) -> None:
    conn.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "pending")
        .values(state="queued", queued_at=_now())
    )


def requeue_unfinished(conn: Connection) -> int:
    """At start-up: jobs queued or running when the node stopped go back to
    pending, to be published again (their messages may be gone)."""
    result = conn.execute(
        update(Job).where(Job.state.in_(("queued", "running"))).values(state="pending")
    )
    return int(result.rowcount or 0)


def recover_lost(conn: Connection, started_before: datetime, max_attempts: int) -> tuple[int, int]:
    """Jobs still ``running`` since before ``started_before`` lost their
    worker: no task outlives its hard time limit, and one killed by that limit,
    or with its whole worker, cannot record its own end. Back to pending, or
    failed once they have had ``max_attempts`` runs. Returns (requeued, failed)."""
    stale = (Job.state == "running", Job.started_at < started_before)
    failed = conn.execute(
        update(Job)
        .where(*stale, Job.attempts >= max_attempts)
        .values(
            state="failed",
            finished_at=_now(),
            error=f"worker lost or time limit exceeded in {max_attempts} attempts",
        )
    )
    requeued = conn.execute(update(Job).where(*stale).values(state="pending"))
    return int(requeued.rowcount or 0), int(failed.rowcount or 0)


def mark_running(conn: Connection, job_id: int) -> None:
    conn.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(state="running", started_at=_now(), attempts=Job.attempts + 1)
    )


def mark_succeeded(conn: Connection, job_id: int) -> None:
    conn.execute(
        update(Job).where(Job.id == job_id).values(state="succeeded", finished_at=_now(), error="")
    )


def mark_failed(conn: Connection, job_id: int, reason: str) -> None:
    conn.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(state="failed", finished_at=_now(), error=reason[:_ERROR_MAX])
    )


def counts(conn: Connection) -> dict[str, int]:
    rows = conn.execute(select(Job.state, func.count()).group_by(Job.state))
    return {state: int(n) for state, n in rows}


def requeue_failed(conn: Connection, ids: Sequence[int] | None = None) -> list[int]:
    """An operator's retry: failed jobs (all, or those in ``ids``) back to
    pending, for the dispatcher to publish again. Returns the ids."""
    where = [Job.state == "failed"]
    if ids is not None:
        where.append(Job.id.in_(list(ids)))
    rows = conn.execute(
        update(Job).where(*where).values(state="pending", error="").returning(Job.id)
    )
    return sorted(int(i) for i in rows.scalars())
