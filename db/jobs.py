"""The job lifecycle: the one module that creates job rows and writes ``job.state``.

    pending ──dispatcher took it to publish──▶ queued ──a worker claimed it──▶ running
    running ──▶ succeeded | failed
    running ──cpu part done, the models' part published──▶ queued    (hand_off, published)
    running ──a transient error, Celery retries the task──▶ queued   (release)
    running, its lease expired (worker died) ──▶ pending | failed    (reclaim_expired)
    queued by a hand-off never published, lease expired ──▶ pending  (reclaim_expired)
    queued ──the publish failed──▶ pending                           (unpublish)
    queued ──node restarted──▶ pending                               (requeue_unfinished)
    failed ──an operator's retry──▶ pending                          (requeue_failed)

**Leases.** The worker running a job holds its lease: ``lease_owner`` (host
and process) and ``lease_expires_at``, renewed by a heartbeat every few
seconds (``job_heartbeat_timeout_s``). A worker killed outright (SIGKILL, the
OOM killer, a host gone) stops renewing; the dispatcher takes its jobs back
once their lease expired and publishes them again, on every broker, whether
or not the broker redelivers the message itself.

**Fencing.** ``fence`` counts the messages published for a job: each one
carries the value it was published with, and a worker may claim a job only
with the message of its current ``fence`` while the job is ``queued``. Every
later transition of a worker (renew, hand off, release, succeed, fail) is an
UPDATE guarded by fence, owner and ``running``: a stale or duplicated message
(the broker redelivering beside the dispatcher) finds nothing to claim, and a
worker that comes back after its lease was taken commits nothing over the
new attempt.

Who calls what: the assembler writes a job in the transaction that marks its
group triggered (:func:`create_job` from :func:`pacsnode.db.assembly.trigger`);
an administrator's reprocess writes one too (:mod:`pacsnode.db.admin`); the
dispatcher (:mod:`pacsnode.workers.dispatcher`) moves pending jobs to queued
and takes back those whose lease expired; the Celery tasks
(:mod:`pacsnode.workers.tasks`) claim them and mark them succeeded or failed.
Every function takes the caller's connection, so a transition commits with
whatever else the caller writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from pacsnode.core.states import JobKind, JobState
from pacsnode.db.models import Job

ERROR_MAX = 1024
LEASE_OWNER_MAX = 128
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
            fence=0,
            lease_owner="",
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


@dataclass(frozen=True)
class Lease:
    """A worker's hold on a job: the message's fence and the holder."""

    job_id: int
    fence: int
    owner: str


def mark_queued(conn: Connection, job_id: int) -> int | None:
    """Take a pending job to publish it: queued, with the next fence, which
    the message must carry (the row says queued before the message exists, so
    a worker quick to receive it finds it claimable). None if it was not
    pending. If the publish fails, :func:`unpublish` puts it back."""
    fence = conn.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.PENDING)
        .values(
            state=JobState.QUEUED,
            queued_at=_now(),
            fence=Job.fence + 1,
            lease_owner="",
            lease_expires_at=None,
        )
        .returning(Job.fence)
    ).scalar_one_or_none()
    return None if fence is None else int(fence)


def unpublish(conn: Connection, job_id: int, fence: int) -> None:
    """The broker did not take the message of ``fence``: back to pending."""
    conn.execute(
        update(Job)
        .where(Job.id == job_id, Job.fence == fence, Job.state == JobState.QUEUED)
        .values(state=JobState.PENDING, lease_owner="", lease_expires_at=None)
    )


def requeue_unfinished(conn: Connection) -> int:
    """At start-up: queued jobs go back to pending, to be published again
    (their messages may be gone with the broker; a message that survived is
    stale then, and dropped). Running jobs keep their lease: a worker on
    another machine may still be running them, and an expired lease is
    taken back by :func:`reclaim_expired`; running jobs without a lease
    (written before leases existed) go back to pending too."""
    result = conn.execute(
        update(Job)
        .where(
            (Job.state == JobState.QUEUED)
            | ((Job.state == JobState.RUNNING) & Job.lease_expires_at.is_(None))
        )
        .values(state=JobState.PENDING, lease_owner="", lease_expires_at=None, fence=Job.fence + 1)
    )
    return int(result.rowcount or 0)


def reclaim_expired(
    conn: Connection, now: datetime, started_before: datetime, max_attempts: int
) -> tuple[int, int]:
    """Running jobs whose lease expired before ``now`` lost their worker (it
    stopped renewing: killed, or its host gone), and so did queued ones whose
    hand-off was never published (:func:`hand_off`); so did running jobs without
    a lease started before ``started_before`` (rows from before leases
    existed). Back to pending with a new fence, or failed once they have had
    ``max_attempts`` runs. Returns (requeued, failed)."""
    lost = (
        Job.state.in_((JobState.RUNNING, JobState.QUEUED)),
        (Job.lease_expires_at < now)
        | (
            (Job.state == JobState.RUNNING)
            & Job.lease_expires_at.is_(None)
            & (Job.started_at < started_before)
        ),
    )
    # Read first: the dispatcher asks every second, and a write (SQLite's
    # database lock) is needed only when a worker was lost. On PostgreSQL a row
    # locked by a worker's transaction (paused mid-renewal) is skipped, not
    # waited for: the dispatcher never hangs on a paused worker.
    ids = list(
        conn.execute(select(Job.id).where(*lost).with_for_update(skip_locked=True)).scalars()
    )
    if not ids:
        return 0, 0
    failed = conn.execute(
        update(Job)
        .where(Job.id.in_(ids), *lost, Job.attempts >= max_attempts)
        .values(
            state=JobState.FAILED,
            finished_at=_now(),
            lease_owner="",
            lease_expires_at=None,
            fence=Job.fence + 1,
            error=f"worker lost or time limit exceeded in {max_attempts} attempts",
        )
    )
    requeued = conn.execute(
        update(Job)
        .where(Job.id.in_(ids), *lost)
        .values(state=JobState.PENDING, lease_owner="", lease_expires_at=None, fence=Job.fence + 1)
    )
    return int(requeued.rowcount or 0), int(failed.rowcount or 0)


def claim(
    conn: Connection, job_id: int, fence: int, owner: str, expires_at: datetime, *, first: bool
) -> Lease | None:
    """A worker takes the job with the message of ``fence``: running, leased
    to ``owner`` until ``expires_at``. ``first``: the job's first task (a new
    attempt: counted, ``started_at`` set); the models' part, handed off, is
    not. None when the message is stale or a duplicate (the job is not
    queued with this fence): the caller drops it."""
    values: dict[str, object] = {
        "state": JobState.RUNNING,
        "lease_owner": owner[:LEASE_OWNER_MAX],
        "lease_expires_at": expires_at,
    }
    if first:
        values.update(started_at=_now(), attempts=Job.attempts + 1)
    result = conn.execute(
        update(Job)
        .where(Job.id == job_id, Job.fence == fence, Job.state == JobState.QUEUED)
        .values(**values)
    )
    return Lease(job_id, fence, owner[:LEASE_OWNER_MAX]) if result.rowcount == 1 else None


def _held(lease: Lease) -> tuple[Any, ...]:
    return (
        Job.id == lease.job_id,
        Job.fence == lease.fence,
        Job.lease_owner == lease.owner,
        Job.state == JobState.RUNNING,
    )


def renew(conn: Connection, lease: Lease, expires_at: datetime) -> bool:
    """The heartbeat: extend the lease. False when it is no longer held (it
    expired and the job went to another attempt). On PostgreSQL the row stays
    locked until the caller's transaction ends, so a reclaim cannot slip in
    between this check and what the caller commits with it."""
    result = conn.execute(update(Job).where(*_held(lease)).values(lease_expires_at=expires_at))
    return result.rowcount == 1


def hand_off(conn: Connection, lease: Lease, expires_at: datetime) -> int | None:
    """The cpu part is done; the models' part is about to be published:
    queued again with the next fence, which its message carries. The lease
    runs on until :func:`published` (a worker killed before it published
    leaves a queued job whose lease expires, taken back like a running one).
    None when the lease was lost."""
    fence = conn.execute(
        update(Job)
        .where(*_held(lease))
        .values(state=JobState.QUEUED, lease_expires_at=expires_at, fence=Job.fence + 1)
        .returning(Job.fence)
    ).scalar_one_or_none()
    return None if fence is None else int(fence)


def published(conn: Connection, job_id: int, fence: int) -> None:
    """The models' part's message is with the broker: the job waits in the gpu
    queue as long as it takes, without a lease (unless a worker claimed it
    already)."""
    conn.execute(
        update(Job)
        .where(Job.id == job_id, Job.fence == fence, Job.state == JobState.QUEUED)
        .values(lease_owner="", lease_expires_at=None)
    )


def release(conn: Connection, lease: Lease) -> bool:
    """Celery will run the task again (a transient error): queued with the
    same fence, so the retried message claims it."""
    result = conn.execute(
        update(Job)
        .where(*_held(lease))
        .values(state=JobState.QUEUED, lease_owner="", lease_expires_at=None)
    )
    return result.rowcount == 1


def mark_succeeded(conn: Connection, lease: Lease) -> bool:
    """The job is done; False (nothing written) when the lease was lost."""
    result = conn.execute(
        update(Job)
        .where(*_held(lease))
        .values(
            state=JobState.SUCCEEDED,
            finished_at=_now(),
            error="",
            lease_owner="",
            lease_expires_at=None,
        )
    )
    return result.rowcount == 1


def mark_failed(conn: Connection, lease: Lease, reason: str) -> bool:
    """The job failed with ``reason``; False (nothing written) when the lease was lost."""
    result = conn.execute(
        update(Job)
        .where(*_held(lease))
        .values(
            state=JobState.FAILED,
            finished_at=_now(),
            error=reason[:ERROR_MAX],
            lease_owner="",
            lease_expires_at=None,
        )
    )
    return result.rowcount == 1


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
        update(Job)
        .where(*where)
        .values(state=JobState.PENDING, error="", fence=Job.fence + 1)
        .returning(Job.id)
    )
    return sorted(int(i) for i in rows.scalars())
