"""Node statistics for the API, the CLI, the dashboard and ``/metrics``:
counts, throughput, and stage latencies from the timings the pipeline
records (``stage_timing``).

Percentiles are computed here from the newest ``window`` timings of each
stage (or model), the same way on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import Connection, func, insert, select

from pacsnode.core.states import JobState
from pacsnode.db.models import (
    AuditEvent,
    Export,
    Finding,
    Instance,
    Job,
    Segment,
    Series,
    StageTiming,
    Study,
)
from pacsnode.db.queries import Row

WINDOW = 1000


@dataclass(frozen=True)
class Latency(Row):
    stage: str
    model_name: str
    count: int
    p50_s: float
    p95_s: float
    mean_s: float


@dataclass(frozen=True)
class Stats(Row):
    studies: int
    series: int
    instances: int
    findings: int
    segments: int
    jobs: dict[str, int]
    exports: dict[str, int]
    associations: int
    instances_last_hour: int
    jobs_finished_last_hour: int
    jobs_finished_last_day: int
    latencies: list[Latency] = field(default_factory=list)


def _count(conn: Connection, column: Any) -> int:
    return int(conn.execute(select(func.count(column))).scalar_one())


def record_timings(
    conn: Connection,
    job_id: int,
    timings: dict[str, float],
    per_model: Sequence[tuple[str, float]] = (),
    now: datetime | None = None,
) -> None:
    """Store one run's stage timings; ``per_model``: (model name, forward
    seconds) rows, stage ``forward``."""
    at = now or datetime.now(UTC)
    rows = [
        {"job_pk": job_id, "stage": s, "model_name": "", "seconds": t, "recorded_at": at}
        for s, t in timings.items()
    ]
    rows += [
        {"job_pk": job_id, "stage": "forward", "model_name": m, "seconds": t, "recorded_at": at}
        for m, t in per_model
    ]
    if rows:
        conn.execute(insert(StageTiming), rows)


def latencies(conn: Connection, window: int = WINDOW) -> list[Latency]:
    """p50/p95/mean seconds per (stage, model), over the newest ``window``
    timings of each."""
    keys = conn.execute(
        select(StageTiming.stage, StageTiming.model_name)
        .distinct()
        .order_by(StageTiming.stage, StageTiming.model_name)
    ).all()
    out = []
    for stage, model_name in keys:
        values = np.array(
            conn.execute(
                select(StageTiming.seconds)
                .where(StageTiming.stage == stage, StageTiming.model_name == model_name)
                .order_by(StageTiming.id.desc())
                .limit(window)
            )
            .scalars()
            .all(),
            dtype=float,
        )
        if values.size == 0:
            continue
        p50, p95 = np.percentile(values, [50, 95])
        out.append(
            Latency(
                stage, model_name, int(values.size), float(p50), float(p95), float(values.mean())
            )
        )
    return out


def timing_values(conn: Connection, window: int = WINDOW) -> dict[tuple[str, str], list[float]]:
    """The newest timings per (stage, model), for histograms."""
    out: dict[tuple[str, str], list[float]] = {}
    rows = conn.execute(
        select(StageTiming.stage, StageTiming.model_name, StageTiming.seconds)
        .order_by(StageTiming.id.desc())
        .limit(window * 20)
    )
    for stage, model_name, seconds in rows:
        out.setdefault((stage, model_name), []).append(float(seconds))
    return out


def grouped(conn: Connection, column: Any, key: Any) -> dict[str, int]:
    """Row counts of ``column`` per value of ``key``."""
    rows = conn.execute(select(key, func.count(column)).group_by(key))
    return {str(k): int(n) for k, n in rows}


def stats(conn: Connection, now: datetime | None = None) -> Stats:
    now = now or datetime.now(UTC)
    hour, day = now - timedelta(hours=1), now - timedelta(days=1)
    finished = select(func.count(Job.id)).where(Job.state == JobState.SUCCEEDED)
    return Stats(
        studies=_count(conn, Study.id),
        series=_count(conn, Series.id),
        instances=_count(conn, Instance.id),
        findings=_count(conn, Finding.id),
        segments=_count(conn, Segment.id),
        jobs=grouped(conn, Job.id, Job.state),
        exports=grouped(conn, Export.id, Export.state),
        associations=int(
            conn.execute(
                select(func.count(AuditEvent.id)).where(AuditEvent.action.like("association.%"))
            ).scalar_one()
        ),
        instances_last_hour=int(
            conn.execute(
                select(func.count(Instance.id)).where(Instance.received_at >= hour)
            ).scalar_one()
        ),
        jobs_finished_last_hour=int(
            conn.execute(finished.where(Job.finished_at >= hour)).scalar_one()
        ),
        jobs_finished_last_day=int(
            conn.execute(finished.where(Job.finished_at >= day)).scalar_one()
        ),
        latencies=latencies(conn),
    )
