"""Prometheus ``/metrics``: a collector that reads the database (and the
broker's queue depths) at scrape time.

The SCP processes, the dispatcher and the workers are separate processes,
often on separate machines; in-process counters would each see a part. The
database sees everything, so every figure here is derived from it when
Prometheus scrapes: counters are row counts (monotonic while rows are kept),
gauges are current states, and the stage-duration histograms are built from
the newest recorded stage timings (:mod:`db.stats`).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select

from pacsnode.core.settings import Settings
from pacsnode.core.states import ExportState
from pacsnode.db.admin import JOB_STATES
from pacsnode.db.exports import STATES as EXPORT_STATES
from pacsnode.db.models import AuditEvent, Export, Instance, Job
from pacsnode.db.stats import grouped, timing_values
from pacsnode.workers.brokerstate import queue_depths

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class DatabaseCollector(Collector):
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings

    def collect(self) -> Iterator[Metric]:
        with self._engine.connect() as conn:
            instances = conn.execute(select(func.count(Instance.id))).scalar_one()
            associations = grouped(conn, AuditEvent.id, AuditEvent.action)
            jobs = grouped(conn, Job.id, Job.state)
            exports = grouped(conn, Export.id, Export.state)
            export_failures = conn.execute(
                select(func.count(AuditEvent.id)).where(
                    AuditEvent.action == "export.attempt", AuditEvent.outcome != ExportState.SENT
                )
            ).scalar_one()
            timings = timing_values(conn)
        yield CounterMetricFamily(
            "pacsnode_instances_received", "Instances received and indexed", value=instances
        )
        assoc = CounterMetricFamily(
            "pacsnode_associations", "DICOM associations ended", labels=["outcome"]
        )
        for action, count in associations.items():
            if action.startswith("association."):
                assoc.add_metric([action.split(".", 1)[1]], count)
        yield assoc
        job_gauge = GaugeMetricFamily("pacsnode_jobs", "Jobs by state", labels=["state"])
        for state in JOB_STATES:
            job_gauge.add_metric([state], jobs.get(state, 0))
        yield job_gauge
        export_gauge = GaugeMetricFamily("pacsnode_exports", "Exports by state", labels=["state"])
        for state in EXPORT_STATES:
            export_gauge.add_metric([state], exports.get(state, 0))
        yield export_gauge
        yield CounterMetricFamily(
            "pacsnode_export_failures", "Failed export attempts", value=export_failures
        )
        depth = GaugeMetricFamily(
            "pacsnode_queue_depth", "Messages waiting in the broker", labels=["queue"]
        )
        for name, count in queue_depths(self._settings).items():
            depth.add_metric([name], count)
        yield depth
        hist = HistogramMetricFamily(
            "pacsnode_stage_duration_seconds",
            "Pipeline stage durations (newest recorded runs)",
            labels=["stage", "model"],
        )
        for (stage, model), values in sorted(timings.items()):
            buckets = [(str(b), float(sum(v <= b for v in values))) for b in BUCKETS]
            buckets.append(("+Inf", float(len(values))))
            hist.add_metric([stage, model], buckets, sum_value=sum(values))
        yield hist


def render(engine: Engine, settings: Settings) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(engine, settings))
    return generate_latest(registry)
