"""Retention: which studies may be deleted, and deleting them consistently.

A study is a candidate when its last instance (received, or written by the
node as a result) arrived before the cut-off. It is kept, whatever its age,
while any of its data is still owed to someone:

- an assembly still ``assembling`` (instances not yet turned into a job);
- a job ``pending``, ``queued`` or ``running`` (a job retried after a
  transient error stays ``running`` or goes back to ``pending``, so it is
  kept too); a ``failed`` job has given up (its reason stays in the
  job row until the study is deleted) and does not hold a study back;
- an export ``pending``, ``sending`` or ``retrying``; a ``failed`` export
  (past its deadline) too, unless ``discard_failed_exports``: an operator
  may still ``pacsnode exports retry`` it.

Deleting a study removes, in one transaction, its export, segment, finding,
job, assembly, instance, series and study rows and its patient when no other
study refers to it; only after the commit are its files removed (spool
files, result masks, preprocessing cache). A crash between the two leaves
unreferenced files, never rows pointing at missing files. The transaction
first touches the study row (an UPDATE that takes the row lock on
PostgreSQL and the write lock on SQLite) and re-checks age and the reasons to
keep under that lock, so an instance indexed meanwhile, which updates the
same row, either lands before the check (the study is kept) or waits and
starts a new study after the commit.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Select, delete, func, select, update

from pacsnode.core.layout import DataLayout
from pacsnode.core.states import (
    UNFINISHED_JOB_STATES,
    UNSENT_EXPORT_STATES,
    AssemblyState,
    ExportState,
)
from pacsnode.db.models import (
    Assembly,
    Export,
    Finding,
    Instance,
    Job,
    Patient,
    Segment,
    Series,
    Study,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StudyVerdict:
    """One old study: deleted (or, in a dry run, deletable) or kept, and why."""

    study_instance_uid: str
    last_received_at: datetime
    instances: int
    size_bytes: int
    keep_reasons: list[str] = field(default_factory=list)
    deleted: bool = False

    @property
    def deletable(self) -> bool:
        return not self.keep_reasons

    def as_json(self) -> dict[str, object]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "last_received_at": self.last_received_at.isoformat(),
            "instances": self.instances,
            "size_bytes": self.size_bytes,
            "deleted": self.deleted,
            "keep_reasons": self.keep_reasons,
        }


@dataclass(frozen=True, slots=True)
class _Files:
    spool: list[str]
    masks: list[str]
    series_uids: list[str]


def keep_reasons(conn: Connection, study_pk: int, discard_failed_exports: bool) -> list[str]:
    """Why the study must stay (empty: it may go)."""
    reasons = []
    assembling = conn.execute(
        select(func.count())
        .select_from(Assembly)
        .where(Assembly.study_pk == study_pk, Assembly.state == AssemblyState.ASSEMBLING)
    ).scalar_one()
    if assembling:
        reasons.append("still being received (not yet complete)")
    jobs = conn.execute(
        select(Job.id, Job.state)
        .where(Job.study_pk == study_pk, Job.state.in_(UNFINISHED_JOB_STATES))
        .order_by(Job.id)
    ).all()
    reasons += [f"job {job_id} is {state}" for job_id, state in jobs]
    export_states = (
        UNSENT_EXPORT_STATES
        if discard_failed_exports
        else (*UNSENT_EXPORT_STATES, ExportState.FAILED)
    )
    exports = conn.execute(
        select(Export.id, Export.destination, Export.state)
        .join(Instance, Instance.id == Export.instance_pk)
        .join(Series, Series.id == Instance.series_pk)
        .where(Series.study_pk == study_pk, Export.state.in_(export_states))
        .order_by(Export.id)
    ).all()
    for export_id, destination, state in exports:
        hint = " (pacsnode exports retry, or retention.discard_failed_exports)"
        reasons.append(
            f"export {export_id} to {destination} is {state}"
            + (hint if state == ExportState.FAILED else "")
        )
    return reasons


def _candidates(conn: Connection, cutoff: datetime) -> list[tuple[int, str, datetime, int, int]]:
    stmt = (
        select(
            Study.id,
            Study.study_instance_uid,
            Study.last_received_at,
            func.count(Instance.id),
            func.coalesce(func.sum(Instance.size_bytes), 0),
        )
        .outerjoin(Series, Series.study_pk == Study.id)
        .outerjoin(Instance, Instance.series_pk == Series.id)
        .where(Study.last_received_at < cutoff)
        .group_by(Study.id, Study.study_instance_uid, Study.last_received_at)
        .order_by(Study.last_received_at, Study.id)
    )
    return [(int(a), str(b), c, int(d), int(e)) for a, b, c, d, e in conn.execute(stmt).all()]


def _delete_rows(conn: Connection, study_pk: int) -> _Files:
    series_pks = select(Series.id).where(Series.study_pk == study_pk)
    instance_pks = select(Instance.id).where(Instance.series_pk.in_(series_pks))

    def column(stmt: Select[Any]) -> list[str]:
        return [str(value) for value in conn.execute(stmt).scalars()]

    files = _Files(
        spool=column(select(Instance.path).where(Instance.id.in_(instance_pks))),
        masks=column(select(Segment.mask_path).where(Segment.study_pk == study_pk)),
        series_uids=column(select(Series.series_instance_uid).where(Series.study_pk == study_pk)),
    )
    patient_pk = conn.execute(select(Study.patient_pk).where(Study.id == study_pk)).scalar_one()
    job_pks = select(Job.id).where(Job.study_pk == study_pk)
    conn.execute(
        delete(Export).where(Export.instance_pk.in_(instance_pks) | Export.job_pk.in_(job_pks))
    )
    conn.execute(delete(Segment).where(Segment.study_pk == study_pk))
    conn.execute(delete(Finding).where(Finding.study_pk == study_pk))
    conn.execute(delete(Job).where(Job.study_pk == study_pk))
    conn.execute(delete(Assembly).where(Assembly.study_pk == study_pk))
    conn.execute(delete(Instance).where(Instance.id.in_(instance_pks)))
    conn.execute(delete(Series).where(Series.study_pk == study_pk))
    conn.execute(delete(Study).where(Study.id == study_pk))
    others = conn.execute(
        select(func.count()).select_from(Study).where(Study.patient_pk == patient_pk)
    ).scalar_one()
    if not others:
        conn.execute(delete(Patient).where(Patient.id == patient_pk))
    return files


def _remove_files(data_dir: Path, spool_dir: Path, files: _Files) -> None:
    """Only the files the rows named, then folders left empty: an instance
    of a new study with the same UIDs, stored meanwhile, survives."""
    folders: set[Path] = set()
    for relpath in files.spool:
        path = spool_dir / relpath
        path.unlink(missing_ok=True)
        folders.update((path.parent, path.parent.parent))
    layout = DataLayout(data_dir)
    results = layout.results
    for relpath in files.masks:
        path = results / relpath
        path.unlink(missing_ok=True)
        folders.update((path.parent, path.parent.parent))
    cache = layout.preprocessed
    for uid in files.series_uids:
        # The cache is keyed by series (pacsnode never writes other files there).
        if uid and "/" not in uid and uid not in (".", ".."):
            shutil.rmtree(cache / uid, ignore_errors=True)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if folder in (spool_dir, results):
            continue
        with contextlib.suppress(OSError):  # not empty (something new arrived) or gone
            folder.rmdir()


def apply_retention(
    engine: Engine,
    *,
    data_dir: Path,
    spool_dir: Path,
    cutoff: datetime,
    discard_failed_exports: bool = False,
    dry_run: bool = False,
) -> list[StudyVerdict]:
    """Delete (unless ``dry_run``) every study last received before ``cutoff``
    that nothing holds back; return a verdict for each old study."""
    with engine.connect() as conn:
        candidates = _candidates(conn, cutoff)
        verdicts = [
            StudyVerdict(uid, last, n, size, keep_reasons(conn, pk, discard_failed_exports))
            for pk, uid, last, n, size in candidates
        ]
    if dry_run:
        return verdicts
    for (study_pk, *_), verdict in zip(candidates, verdicts, strict=True):
        if verdict.keep_reasons:
            continue
        with engine.begin() as conn:
            locked = conn.execute(
                update(Study)
                .where(Study.id == study_pk, Study.last_received_at < cutoff)
                .values(last_received_at=Study.last_received_at)
            ).rowcount
            if not locked:
                verdict.keep_reasons.append("received new instances during clean-up")
                continue
            verdict.keep_reasons = keep_reasons(conn, study_pk, discard_failed_exports)
            if verdict.keep_reasons:
                continue
            files = _delete_rows(conn, study_pk)
        _remove_files(data_dir, spool_dir, files)
        verdict.deleted = True
        log.info(
            "retention: deleted study %s (%d instances, %d bytes)",
            verdict.study_instance_uid,
            verdict.instances,
            verdict.size_bytes,
        )
    return verdicts


def summarize(verdicts: Iterable[StudyVerdict], dry_run: bool) -> dict[str, int]:
    """Studies, instances and bytes deleted (or deletable, in a dry run)."""
    done = [v for v in verdicts if (v.deletable if dry_run else v.deleted)]
    return {
        "studies": len(done),
        "instances": sum(v.instances for v in done),
        "bytes": sum(v.size_bytes for v in done),
    }
