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


def test_transitions_and_counts(database_url: str) -> None:
    engine = create_db_engine(database_url)
    upgrade(engine)
    a, b = _job(engine, 1), _job(engine, 2)
    with engine.begin() as conn:
        assert jobs.pending_jobs(conn) == [a, b]
        jobs.mark_queued(conn, a)
        jobs.mark_running(conn, a)
        jobs.mark_running(conn, a)  # redelivered: a second run
        jobs.mark_succeeded(conn, a)
        jobs.mark_failed(conn, b, "x" * 5000)
        assert jobs.counts(conn) == {"succeeded": 1, "failed": 1}
    assert _state(engine, a).attempts == 2
    assert len(_state(engine, b).error) == 1024


def test_restart_publishes_queued_and_running_jobs_again(database_url: str) -> None:
    engine = create_db_engine(database_url)
    upgrade(engine)
    queued, running, done = _job(engine, 1), _job(engine, 2), _job(engine, 3)
    with engine.begin() as conn:
        for job_id in (queued, running, done):
            jobs.mark_queued(conn, job_id)
        jobs.mark_running(conn, running)
        jobs.mark_running(conn, done)
        jobs.mark_succeeded(conn, done)
        assert jobs.requeue_unfinished(conn) == 2
        assert jobs.pending_jobs(conn) == [queued, running]


def test_job_whose_worker_was_lost_is_published_again_then_failed(database_url: str) -> None:
    engine = create_db_engine(database_url)
    upgrade(engine)
    lost, fresh = _job(engine, 1), _job(engine, 2)
    with engine.begin() as conn:
        for job_id in (lost, fresh):
            jobs.mark_queued(conn, job_id)
            jobs.mark_running(conn, job_id)
    # Within the time limit nothing happens; past it, only the old one moves.
    assert recover_lost_jobs(engine) == (0, 0)
    later = datetime.now(UTC) + timedelta(seconds=LOST_JOB_AFTER_S + 60)
    with engine.begin() as conn:
        conn.execute(
            Job.__table__.update()
            .where(Job.id == fresh)
            .values(started_at=later - timedelta(seconds=5))
        )
    assert recover_lost_jobs(engine, now=later) == (1, 0)
    assert _state(engine, lost).state == "pending"
    assert _state(engine, fresh).state == "running"
    # Each run counts; after MAX_ATTEMPTS runs a lost job fails with a reason.
    for _ in range(MAX_ATTEMPTS - 1):
        with engine.begin() as conn:
            jobs.mark_running(conn, lost)
    assert recover_lost_jobs(engine, now=later) == (0, 1)
    job = _state(engine, lost)
    assert job.state == "failed"
    assert job.attempts == MAX_ATTEMPTS
    assert "worker lost" in job.error


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
