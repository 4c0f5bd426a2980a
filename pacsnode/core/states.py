"""The states of pacsnode's rows, one :class:`enum.StrEnum` per lifecycle.

Each value is the string stored in the database and shown by the API, the
CLI and the dashboard, so the schema and the interfaces are those of plain
strings; code compares and writes members, never literals. Who moves a row
from one state to the next: docs/architecture.md §6
(jobs: :mod:`pacsnode.db.jobs`; exports: :mod:`pacsnode.db.exports`; study
and series assembly: :mod:`pacsnode.db.assembly`; fusion waits:
:mod:`pacsnode.db.fusion`).
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """``job.state``: pending → queued → running → succeeded | failed."""

    PENDING = "pending"  # written (the outbox); the dispatcher publishes it
    QUEUED = "queued"  # the broker took its message
    RUNNING = "running"  # a worker started it
    SUCCEEDED = "succeeded"
    FAILED = "failed"


# Jobs a worker may still run (or run again after a restart).
UNFINISHED_JOB_STATES = (JobState.PENDING, JobState.QUEUED, JobState.RUNNING)


class JobKind(StrEnum):
    """``job.kind``: why the job exists."""

    INITIAL = "initial"  # a study (or series) became complete
    UPDATE = "update"  # more series arrived after it was processed
    RERUN = "rerun"  # an administrator asked to reprocess the study


class StudyStatus(StrEnum):
    """A study's status in the query layer: its newest job's state, or
    ``receiving`` before it has a job."""

    RECEIVING = "receiving"
    PENDING = JobState.PENDING.value
    QUEUED = JobState.QUEUED.value
    RUNNING = JobState.RUNNING.value
    SUCCEEDED = JobState.SUCCEEDED.value
    FAILED = JobState.FAILED.value


class AssemblyState(StrEnum):
    """``assembly.state`` of a study or series group."""

    ASSEMBLING = "assembling"  # instances arrive; not complete yet
    TRIGGERED = "triggered"  # complete: its job was written


class ExportState(StrEnum):
    """``export.state``: pending → sending → sent, or retrying → … → failed."""

    PENDING = "pending"
    SENDING = "sending"  # claimed by a worker (until its lease ends)
    RETRYING = "retrying"  # failed; due again after its backoff
    SENT = "sent"
    FAILED = "failed"  # at or past its deadline


# Rows a worker should send now (when their next attempt is due).
DUE_EXPORT_STATES = (ExportState.PENDING, ExportState.RETRYING)
# Rows an administrator may send again.
RETRYABLE_EXPORT_STATES = (ExportState.FAILED, ExportState.RETRYING)
# Rows not delivered yet, and not given up on.
UNSENT_EXPORT_STATES = (ExportState.PENDING, ExportState.SENDING, ExportState.RETRYING)


class FusionState(StrEnum):
    """The outcome of a fusion model for a study (``fusion_outcome.state``)."""

    WAITING = "waiting"  # a role's series has not arrived yet
    INCOMPLETE = "incomplete"  # the wait ended without it
    FUSED = "fused"
    FAILED = "failed"
