"""The Celery tasks' names and time limits, defined once.

The task layer (:mod:`pacsnode.workers.tasks`, :mod:`pacsnode.workers.celery_app`)
declares its tasks with these; what depends on them derives from them here:
the dispatcher publishes by name and takes a job that has been ``running``
for longer than its task may run as lost (:data:`LOST_JOB_AFTER_S`), and an
export claim expires when no ``export_due`` task can still hold it
(:data:`EXPORT_LEASE_S`, used by :mod:`pacsnode.db.exports`). They live in the
core because the database layer needs them and may not import the workers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskDef:
    """A task's registered name and limits. The worker kills the task after
    ``time_limit_s``; ``soft_time_limit_s`` earlier it raises inside the task
    so the task can record its failure."""

    name: str
    time_limit_s: int
    soft_margin_s: int

    @property
    def soft_time_limit_s(self) -> int:
        return self.time_limit_s - self.soft_margin_s


# cpu queue: a job's load and preprocess stages.
RUN_JOB = TaskDef("pacsnode.run_job", time_limit_s=1800, soft_margin_s=100)
# gpu queue: every stage of a job that a model applies to.
INFER_JOB = TaskDef("pacsnode.infer_job", time_limit_s=1800, soft_margin_s=100)
# cpu queue: send the export rows that are due.
EXPORT_DUE = TaskDef("pacsnode.export_due", time_limit_s=600, soft_margin_s=60)

# A job running this long has lost its worker: no job task outlives its hard
# limit, and one killed by it (or with its whole worker) cannot record its end.
LOST_JOB_AFTER_S = max(RUN_JOB.time_limit_s, INFER_JOB.time_limit_s) + 60
# An export claim older than this lost its worker: export_due's hard limit plus a minute.
EXPORT_LEASE_S = float(EXPORT_DUE.time_limit_s + 60)
