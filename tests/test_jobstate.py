"""Job state and results on both databases, without a broker: the outbox
rows the assembler writes, what the dispatcher does with jobs whose worker
was lost, and results that a re-run replaces."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, select

from pacsnode.core.taskdefs import LOST_JOB_AFTER_S
from pacsnode.db import jobs
from pacsnode.db.assembly import Arrival, assembling, note_arrivals, trigger
from pacsnode.db.index import upsert_instances
from pacsnode.db.migrate import upgrade
from pacsnode.db.models import Finding, Job, Segment, Series
from pacsnode.db.results import Code, FindingRecord, ModelIdentity, SegmentRecord, replace_results
from pacsnode.db.session import create_db_engine
from pacsnode.workers.dispatcher import MAX_ATTEMPTS, recover_lost_jobs
from tests.test_index import _record


def _job(engine: Engine, study: int) -> int:
    """One indexed instance of its own study, assembled and triggered."""
    now = datetime.now(UTC)
    record = _record(1, study=study)
    with engine.begin() as conn:
        study_pk, _ = upsert_instances(conn, [record])[record.series_instance_uid]
        arrival = Arrival(record.study_instance_uid, "study", study_pk, None, "CT1", now, 0)
        note_arrivals(conn, [arrival])
        row = next(r for r in assembling(conn) if r.key_uid == record.study_instance_uid)
        job_id = trigger(conn, row, "quiet_period", now)
    assert job_id is not None
    return job_id


def _state(engine: Engine, job_id: int) -> Job:
    with engine.connect() as conn:
        return conn.execute(select(Job).where(Job.id == job_id)).one()  # type: ignore[return-value]


def _claim(engine: Engine, job_id: int, owner: str = "host-a pid 1", ttl: float = 15) -> jobs.Lease:
    """Queue the job (as the dispatcher does) and claim it (as a worker does)."""
    with engine.begin() as conn:
        fence = jobs.mark_queued(conn, job_id)
        assert fence is not None
        held = jobs.claim(conn, job_id, fence, owner, expiry(ttl), first=True)
    assert held is not None
    return held


def expiry(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def test_transitions_and_counts(database_url: str) -> None:
    engine = create_db_engine(database_url)
    upgrade(engine)
    a, b = _job(engine, 1), _job(engine, 2)
    with engine.begin() as conn:
        assert jobs.pending_jobs(conn) == [a, b]
    held_a, held_b = _claim(engine, a), _claim(engine, b)
    with engine.begin() as conn:
        assert jobs.mark_succeeded(conn, held_a)
        assert jobs.mark_failed(conn, held_b, "x" * 5000)
        assert jobs.counts(conn) == {"succeeded": 1, "failed": 1}
    assert _state(engine, a).attempts == 1
    assert len(_state(engine, b).error) == 1024
    assert (_state(engine, a).lease_owner, _state(engine, a).lease_expires_at) == ("", None)


def test_a_message_claims_its_job_once_and_only_with_the_current_fence(database_url: str) -> None:
    engine = create_db_engine(database_url)
    upgrade(engine)
    job_id = _job(engine, 1)
    with engine.begin() as conn:
        fence = jobs.mark_queued(conn, job_id)
        assert fence == 1 and jobs.mark_queued(conn, job_id) is None  # not pending any more
        assert jobs.claim(conn, job_id, fence - 1, "w", expiry(15), first=True) is None
        held = jobs.claim(conn, job_id, fence, "w1", expiry(15), first=True)
        # The broker delivers the same message again: nothing to claim.
        assert held is not None
        assert jobs.claim(conn, job_id, fence, "w2", expiry(15), first=True) is None
        # The cpu part hands off to the models' part with the next fence.
        models_fence = jobs.hand_off(conn, held, expiry(15))
        assert models_fence == fence + 1
        assert jobs.claim(conn, job_id, fence, "w2", expiry(15), first=False) is None
        assert models_fence is not None
        jobs.published(conn, job_id, models_fence)
        second = jobs.claim(conn, job_id, models_fence, "w2", expiry(15), first=False)
        assert second is not None
        assert not jobs.renew(conn, held, expiry(15))  # the first holder's lease ended
        assert jobs.renew(conn, second, expiry(15))
        # A transient error: Celery retries the same message, which claims it again.
        assert jobs.release(conn, second)
        third = jobs.claim(conn, job_id, models_fence, "w3", expiry(15), first=False)
        assert third is not None and jobs.mark_succeeded(conn, third)
    job = _state(engine, job_id)
    assert (job.state, job.attempts, job.fence) == ("succeeded", 1, 2)


def test_restart_publishes_queued_jobs_again_and_leaves_leased_ones(database_url: str) -> None:
    engine = create_db_engine(database_url)
    upgrade(engine)
    queued, running, done, legacy = (_job(engine, k) for k in (1, 2, 3, 4))
    with engine.begin() as conn:
        jobs.mark_queued(conn, queued)
    _claim(engine, running)
    with engine.begin() as conn:
        assert jobs.mark_succeeded(conn, _claim(engine, done))
    legacy_lease = _claim(engine, legacy)
    with engine.begin() as conn:  # running, written before leases existed
        conn.execute(Job.__table__.update().where(Job.id == legacy).values(lease_expires_at=None))
        assert jobs.requeue_unfinished(conn) == 2
        assert jobs.pending_jobs(conn) == [queued, legacy]
        assert not jobs.renew(conn, legacy_lease, expiry(15))
    assert _state(engine, running).state == "running"


def test_a_job_whose_lease_expired_is_published_again_then_failed(database_url: str) -> None:
    engine = create_db_engine(database_url)
    upgrade(engine)
    lost, fresh = _job(engine, 1), _job(engine, 2)
    zombie = _claim(engine, lost, owner="host-a pid 7", ttl=15)
    _claim(engine, fresh, ttl=60)
    # Within the lease nothing happens; past it, only the expired one moves.
    assert recover_lost_jobs(engine) == (0, 0)
    later = datetime.now(UTC) + timedelta(seconds=30)
    assert recover_lost_jobs(engine, now=later) == (1, 0)
    assert _state(engine, lost).state == "pending"
    assert _state(engine, fresh).state == "running"
    # The worker that lost it comes back: it can neither renew nor finish the job.
    with engine.begin() as conn:
        assert not jobs.renew(conn, zombie, expiry(15))
        assert not jobs.mark_succeeded(conn, zombie)
        assert not jobs.mark_failed(conn, zombie, "late")
    assert _state(engine, lost).state == "pending"
    # Each run counts; after MAX_ATTEMPTS runs a lost job fails with a reason.
    for _ in range(MAX_ATTEMPTS - 1):
        _claim(engine, lost, ttl=1)
        assert recover_lost_jobs(engine, now=later)[0] in (0, 1)
    assert _state(engine, lost).attempts == MAX_ATTEMPTS
    job = _state(engine, lost)
    assert job.state == "failed"
    assert "worker lost" in job.error


def test_a_hand_off_whose_message_was_never_published_is_taken_back(database_url: str) -> None:
    engine = create_db_engine(database_url)
    upgrade(engine)
    unpublished, waiting = _job(engine, 1), _job(engine, 2)
    first, second = _claim(engine, unpublished), _claim(engine, waiting)
    with engine.begin() as conn:
        # The worker died between the hand-off and the publish.
        assert jobs.hand_off(conn, first, expiry(15)) is not None
        # This one was published: it waits in the gpu queue as long as it takes.
        fence = jobs.hand_off(conn, second, expiry(15))
        assert fence is not None
        jobs.published(conn, waiting, fence)
    assert recover_lost_jobs(engine) == (0, 0)
    later = datetime.now(UTC) + timedelta(seconds=30)
    assert recover_lost_jobs(engine, now=later) == (1, 0)
    assert (_state(engine, unpublished).state, _state(engine, waiting).state) == (
        "pending",
        "queued",
    )
    # Published again, it waits in the queue without a lease.
    with engine.begin() as conn:
        assert jobs.mark_queued(conn, unpublished) is not None
    assert recover_lost_jobs(engine, now=later) == (0, 0)


def test_a_running_job_without_a_lease_is_lost_after_the_time_limit(database_url: str) -> None:
    engine = create_db_engine(database_url)
    upgrade(engine)
    job_id = _job(engine, 1)
    _claim(engine, job_id)
    with engine.begin() as conn:
        conn.execute(Job.__table__.update().where(Job.id == job_id).values(lease_expires_at=None))
    assert recover_lost_jobs(engine) == (0, 0)
    later = datetime.now(UTC) + timedelta(seconds=LOST_JOB_AFTER_S + 60)
    assert recover_lost_jobs(engine, now=later) == (1, 0)


def test_a_rerun_replaces_results_never_duplicates(database_url: str) -> None:
    engine = create_db_engine(database_url)
    upgrade(engine)
    job_id = _job(engine, 1)
    with engine.connect() as conn:
        job = conn.execute(select(Job).where(Job.id == job_id)).one()
        series_pk = conn.execute(select(Series.id).where(Series.study_pk == job.study_pk)).scalar()
    model = ModelIdentity("lesion-classifier", "1.0.0", "ab" * 32, "classification")
    lesion = Code("SCT", "52988006", "Lesion")
    segment = SegmentRecord(1, lesion, 10, 12.5, (0, 1, 2, 3, 4, 5), 80.0, False, "x.npz")
    for probability in (0.9, 0.2):
        with engine.begin() as conn:
            replace_results(
                conn,
                job_id=job_id,
                study_pk=job.study_pk,
                series_pk=series_pk,
                model=model,
                findings=[FindingRecord(lesion, probability, probability > 0.5, False, 0.01)],
                segments=[segment],
            )
    with engine.connect() as conn:
        findings = conn.execute(select(Finding)).all()
        segments = conn.execute(select(Segment)).all()
    assert [(f.probability, f.positive, f.model_version) for f in findings] == [
        (0.2, False, "1.0.0")
    ]
    assert [(s.volume_mm3, s.bbox_x1, s.mask_path) for s in segments] == [(12.5, 5, "x.npz")]
